"""Build hook: ships the user-editable top-level folders inside the wheel (everything else: pyproject.toml).

`serve/` (serving presets, launch scripts) and `calibrate/` (recipes) live at the repository root,
where users edit them. A wheel has no repository root, so build_py copies both into the package
as `tlq_vllm/_bundled/`; `tlq_vllm.paths.user_folder` reads the checkout's folder when there is
one and the bundled copy otherwise.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = {"serve": ("*.yaml", "*.sh", "*.md"), "calibrate": ("*.yaml", "*.md")}


class BuildPyWithUserFolders(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's folders themselves
        for folder, patterns in BUNDLED.items():
            target = Path(self.build_lib, "tlq_vllm", "_bundled", folder)
            self.mkpath(str(target))
            for pattern in patterns:
                for source in sorted(Path(folder).glob(pattern)):
                    self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": BuildPyWithUserFolders})
