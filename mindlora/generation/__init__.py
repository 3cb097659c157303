"""Generation: KV-cached, batched, TP/PP-parallel decoding over megatron-core GPTModel chunks.

``Generator`` (engine) turns prompt ids into answer ids; ``ChatFormat`` (prompts) renders prompts
with the chat templates and decodes answers; ``load_for_generation`` (loading) builds the model
from a base checkpoint and an optional adapter; ``cli.run`` is ``python -m mindlora.generate``.
"""
from mindlora.generation.engine import Generation, Generator, PipelineGroup
from mindlora.generation.prompts import ChatFormat, PromptRecord, read_prompt_file
from mindlora.generation.sampling import SamplingConfig

__all__ = ["ChatFormat", "Generation", "Generator", "PipelineGroup", "PromptRecord",
           "SamplingConfig", "read_prompt_file"]
