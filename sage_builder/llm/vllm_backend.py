"""vLLM's offline engine in-process: every request of a call goes to ``LLM.chat`` as ONE batch.

Each request gets its own ``SamplingParams`` (its seed, its token limit) with
``structured_outputs=StructuredOutputsParams(json=schema)``: current vLLM's constrained decoding
(the ``guided_json`` family was removed in 0.12). The engine schedules the whole batch itself
(continuous batching), which is what makes a GPU run fast; ``vllm`` is imported only here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from sage_builder.errors import SageError
from sage_builder.llm.base import (
    LLMBackend,
    LLMRequest,
    TransportFailure,
    request_temperature,
)

log = logging.getLogger("sage.llm.vllm")


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise SageError("llm.backend: vllm is not installed; install the gpu extra: pip install 'sage-builder[gpu]' "
                        "(or use llm.backend: openai against a vLLM server)") from None
    return vllm


class VLLMBackend(LLMBackend):
    name = "vllm"

    def __init__(self, config):  # type: ignore[no-untyped-def]
        super().__init__(config)
        self.llm: Any = None
        self._vllm: Any = None
        # Extra ``vllm.LLM`` arguments set by an executor (e.g. the Ray actor's executor backend).
        self.engine_kwargs: dict[str, Any] = {}

    def check_ready(self) -> None:
        self._load()

    def _load(self) -> None:
        if self.llm is not None:
            return
        vllm = self._vllm = _import_vllm()
        c = self.config
        kwargs: dict[str, Any] = {
            "model": c.model,
            "revision": c.revision,
            "dtype": c.dtype,
            "seed": c.seed,
            "tensor_parallel_size": c.tensor_parallel_size,
            "gpu_memory_utilization": c.gpu_memory_utilization,
        }
        if c.max_model_len is not None:
            kwargs["max_model_len"] = c.max_model_len
        if c.served_model_name:
            kwargs["served_model_name"] = c.served_model_name
        kwargs.update(self.engine_kwargs)
        try:
            self.llm = vllm.LLM(**kwargs)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SageError(f"llm.model: vLLM cannot load '{c.model}': {first[:200]}") from None

    def engines(self) -> tuple[int, float]:
        return 1, float(self.config.tensor_parallel_size)

    def describe(self) -> dict[str, Any]:
        version = getattr(self._vllm, "__version__", None) if self._vllm is not None else None
        return {**super().describe(), "vllm_version": version}

    def sampling_params(self, request: LLMRequest, seed: int) -> Any:
        from vllm.sampling_params import SamplingParams, StructuredOutputsParams

        c = self.config
        return SamplingParams(
            temperature=request_temperature(c, request), top_p=c.top_p, seed=seed,
            max_tokens=request.max_new_tokens or c.max_new_tokens,
            structured_outputs=StructuredOutputsParams(json=request.json_schema()),
        )

    def _complete(self, batch: Sequence[tuple[LLMRequest, int]]) -> Iterator[tuple[str, str | TransportFailure]]:
        if not batch:
            return
        self._load()
        conversations = [request.messages for request, _ in batch]
        params = [self.sampling_params(request, seed) for request, seed in batch]
        outputs = self.llm.chat(conversations, sampling_params=params, use_tqdm=False)
        for (request, _), param, output in zip(batch, params, outputs, strict=True):
            completion = output.outputs[0] if output.outputs else None
            if completion is None:
                yield request.key, TransportFailure("empty_reply")
            elif completion.finish_reason == "length":
                yield request.key, TransportFailure("truncated", f"max_tokens={param.max_tokens} reached")
            else:
                yield request.key, completion.text

    def close(self) -> None:
        self.llm = None
