"""The endpoint backend: answers from a running OpenAI-compatible server (`python -m tlq_vllm.serve`).

This measures the real served kernels: images travel as base64 data URLs in chat-completion
messages, decoding is greedy (temperature 0). Requests run concurrently so the server batches
them; answers come back in item order.
"""

from __future__ import annotations

import base64
import mimetypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from tlq_vllm.eval.vqa import VQAItem


def image_data_url(path) -> str:
    """An image file as a data URL, the form OpenAI chat messages carry images in."""
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def predict(url: str, items: list[VQAItem], *, model: str | None = None, concurrency: int = 8,
            max_tokens: int = 8, timeout: float = 120.0, progress: bool = True) -> list[str]:
    """Greedy answers from the server at `url` (e.g. http://127.0.0.1:8000/v1); `model` defaults
    to the one model the server lists."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="EMPTY", timeout=timeout, max_retries=0)
    model = model or client.models.list().data[0].id

    def ask(item: VQAItem) -> str:
        response = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(item.image)}},
                {"type": "text", "text": item.question},
            ]}],
            temperature=0.0,
            max_tokens=max_tokens,
        )
        return (response.choices[0].message.content or "").strip()

    with ThreadPoolExecutor(concurrency) as pool:
        return list(tqdm(pool.map(ask, items), total=len(items), desc="answer", unit="q", disable=not progress,
                         leave=False))
