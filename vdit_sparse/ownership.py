"""What a handle owns, and the checks that keep "what the handle says" equal to "what runs".

A handle owns the processors it installed and serves the pipeline it was given. diffusers can swap a
module's processor behind it (``fuse_qkv_projections`` on CogVideoX, ``set_attn_processor``, loaders
that install processors), and a pipeline built from an accelerated pipeline's components shares its
transformer. Either would run attention the handle does not see, or count another pipeline's calls as
its own; both are refused at the transformer call, in one line that says how to proceed.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import torch

from .pipelines.processor import HandleProcessor


class ProcessorReplacedError(RuntimeError):
    """A self-attention module holds a processor the handle did not install."""


class SharedTransformerError(RuntimeError):
    """An accelerated transformer was called by another pipeline than the accelerated one."""


@dataclasses.dataclass
class Installed:
    """Our processor on one self-attention module, and the processor it stands in for."""

    name: str  # the module's qualified name in its transformer, e.g. "blocks.3.attn1"
    module: torch.nn.Module
    ours: object
    original: object


def check_stands_in_for(adapter, model: str, name: str, processor) -> None:
    """Refuse, at ``accelerate``, a processor ours cannot reproduce: replacing it would drop what it does."""
    if adapter.stands_in_for(processor):
        return
    stock = adapter.stock_processors[0]
    raise ValueError(
        f"pipe.{model}.{name}: holds {describe(processor)}, which vdit_sparse cannot stand in for (it reproduces "
        f"{', '.join(adapter.stock_processors)}); put a stock {stock} back on it before accelerate; LoRA weights loaded with load_lora_weights need nothing, they live in the projections"
    )


def check_processors(model: str, installed: list[Installed], adapter) -> None:
    """Once per transformer call: every self-attention module still holds the processor we installed."""
    for entry in installed:
        if entry.module.processor is not entry.ours:
            raise ProcessorReplacedError(replaced_message(model, entry, adapter))


def replaced_message(model: str, entry: Installed, adapter) -> str:
    found = entry.module.processor
    then = ("then accelerate again: the new processor is wrapped" if adapter.stands_in_for(found)
            else "vdit_sparse cannot stand in for that processor")
    return (f"pipe.{model}.{entry.name}: its attention processor is now {describe(found)}, not vdit_sparse's "
            f"({likely_cause(entry, found)} after accelerate?), so attention would run outside the handle; "
            f"call .remove() on the handle (it keeps the new processor), {then}")


def likely_cause(entry: Installed, found) -> str:
    if isinstance(found, HandleProcessor):
        return "unfuse_qkv_projections() or set_attn_processor putting back a removed handle's processors"
    if "Fused" in type(found).__name__:
        return "transformer.fuse_qkv_projections()"
    if "Fused" in type(entry.original).__name__:
        return "transformer.unfuse_qkv_projections()"
    return "transformer.set_attn_processor(), or a LoRA or IP-adapter loader that installs processors"


def describe(processor) -> str:
    if isinstance(processor, HandleProcessor):
        return f"{type(processor).__name__} of another vdit_sparse handle"
    return type(processor).__name__


def check_caller(pipe, model: str, transformer) -> None:
    """Refuse a call made by another pipeline than the accelerated one: it shares the transformer (built from
    the accelerated pipeline's components) and its calls would be counted as this handle's."""
    if not isinstance(pipe, pipeline_class()):  # a transformer accelerated on its own serves every pipeline
        return
    caller = calling_pipeline()
    if caller is None or caller is pipe:
        return
    raise SharedTransformerError(
        f"pipe.{model}: this {type(transformer).__name__} was accelerated for another {type(pipe).__name__} "
        f"(this {type(caller).__name__} shares it, e.g. built from its .components); its calls would run and be "
        "counted through that handle: call the accelerated pipeline, or .remove() its handle and accelerate this "
        "one, or accelerate(pipe.transformer) to serve every pipeline that shares it"
    )


def calling_pipeline():
    """The nearest diffusers pipeline whose ``__call__`` is on the stack, or None (a direct transformer call).

    The transformer is all the hook sees; the stack is the one place that says which pipeline drives it.
    One walk per transformer call, a few microseconds.
    """
    pipeline = pipeline_class()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__call__":
            caller = frame.f_locals.get("self")
            if isinstance(caller, pipeline):
                return caller
        frame = frame.f_back
    return None


@functools.cache
def pipeline_class() -> type:
    """diffusers' DiffusionPipeline, looked up once: ``from diffusers import ...`` goes through a lazy module each time."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline


def already_accelerated_message(model: str, transformer, earlier, pipe) -> str:
    """Why a second ``accelerate`` over the same transformer is refused, and what to do instead."""
    if earlier is pipe:
        return f"pipe.{model}: already accelerated; call .remove() on the earlier handle first"
    if earlier is transformer:
        return (f"pipe.{model}: this {type(transformer).__name__} is accelerated on its own (accelerate(transformer)) "
                "and serves every pipeline that uses it; call .remove() on that handle first to accelerate this one")
    return (f"pipe.{model}: this {type(transformer).__name__} is shared with another {type(earlier).__name__} that is "
            "accelerated (a pipeline built from its components shares its transformer); call .remove() on that "
            "pipeline's handle, then accelerate this one, or accelerate(pipe.transformer) to serve both")


def restore(installed: list[Installed], transformer) -> None:
    """Put back the processors we replaced where ours still sit; a processor installed after us stays (the user
    put it there). What the transformer saved of ours for later (CogVideoX's ``fuse_qkv_projections`` keeps the
    processors it replaced for ``unfuse_qkv_projections``) becomes the original too."""
    originals = {id(entry.ours): entry.original for entry in installed}
    for entry in installed:
        ours, original = entry.ours, entry.original
        for attr in ("_parallel_config", "_attention_backend"):  # set on ours by enable_parallelism / set_attention_backend
            if hasattr(original, attr):
                setattr(original, attr, getattr(ours, attr))
        if entry.module.processor is ours:
            entry.module.set_processor(original)
    saved = getattr(transformer, "original_attn_processors", None)
    if isinstance(saved, dict):
        for key, processor in saved.items():
            saved[key] = originals.get(id(processor), processor)
