import sys

from tlq_vllm.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
