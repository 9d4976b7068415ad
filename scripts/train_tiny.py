"""Train the embedded default model on the shapes world: the VAE, then the DiT, then export.

    python scripts/train_tiny.py --stage vae --minutes 4 --ckpt-dir ckpt     # resumes if ckpt/vae.json exists
    python scripts/train_tiny.py --stage dit --minutes 9 --ckpt-dir ckpt     # call again to go on
    python scripts/train_tiny.py --stage export --ckpt-dir ckpt --out vdit_sparse/data/tiny
    python scripts/train_tiny.py --stage eval --ckpt-dir ckpt --out vdit_sparse/data/tiny   # prompt following
    python scripts/train_tiny.py --smoke --stage vae --steps 2 --ckpt-dir /tmp/c   # micro scale, CPU
    python scripts/train_tiny.py --stage decoder-check --steps 300 --ckpt-dir /tmp/c  # can the decoder learn?
    python scripts/train_tiny.py --recipe cpu --stage dit --minutes 60 --ckpt-dir ckpt   # no GPU: see below

Recipes: ``h100`` (the default) trains the VAE on full 25-frame clips and every DiT step on full
25-frame 128 x 128 clips, batch 32. ``cpu`` is for trying the recipe without a GPU: the VAE trains on
64 x 64 crops, and the DiT first learns the world on 25-frame 64 x 64 clips (448 tokens), then adapts
to the full 1,792-token clips. On the 2-core development machine it did not reach a usable VAE in an
hour (docs/embedded_model.md says what it learned); it is kept for experiments at small scale.
Phases are fixed by step number, so a resumed run still sees exactly the data of one long run.

Every stage builds the real diffusers / transformers classes (AutoencoderKLWan,
WanTransformer3DModel, UMT5EncoderModel with the word-level tokenizer of pipelines/tiny.py), and
export writes a WanPipeline directory (safetensors) that ``load_pipeline("tiny")`` picks up.

Flow matching, in diffusers' FlowMatchEulerDiscreteScheduler convention (read in its ``step``:
x_prev = x + (sigma_next - sigma) * model_output, and x0 = x - sigma * model_output):
    x_t = (1 - sigma) * x0 + sigma * eps,   target v = eps - x0,   timestep = 1000 * sigma,
with sigma = shift * u / (1 + (shift - 1) * u), u ~ U(0, 1): the scheduler's own shift, so
training sees noise levels with the density inference visits.

Reproducible from ``--seed``: step ``s`` of a stage draws its clips and its noise from (seed, stage,
s) alone, so a run cut into resumed calls sees the same data as one long run, and no random-generator
state needs saving. Checkpoints: ``DIR/<stage>.json`` names the parts ``DIR/<stage>-<step>.partK``
(each below 15 MiB, so they travel through the device tool's 16 MiB file limit); the manifest is
replaced last, atomically, so a cut-off save leaves the previous checkpoint readable.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vdit_sparse import shapes_world
from vdit_sparse.atomicfile import atomic_write, atomic_write_json
from vdit_sparse.pipelines.tiny import (
    MAX_TEXT_TOKENS, TEXT_ENCODER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, build_tokenizer,
)

STAGES = ("vae", "dit", "export", "eval", "decoder-check")
STAGE_IDS = {"vae": 1, "dit": 2, "stats": 3}
PART_BYTES = 15 * 2**20
MAX_EXPORT_MB = 40


@dataclass(frozen=True)
class Recipe:
    """Sizes and optimisation settings of one training scale."""

    frames: int  # of a generated clip (4k + 1)
    height: int
    width: int
    vae: dict = field(default_factory=dict)
    dit: dict = field(default_factory=dict)
    vae_frames: int = 9  # the VAE is causal and convolutional: it can train on shorter, smaller clips
    vae_size: int | None = None  # side of the VAE's training clips; None: the recipe's height x width
    vae_batch: int = 8
    # None: decode a sample of the posterior (a standard VAE). A float: decode the posterior mean plus Gaussian
    # noise of this std. With kl_weight 1e-4, sampling kept the posterior std near 1 for 1,000 CPU steps, and
    # the decoder, fed latents that noisy, reproduced neither colour nor texture; the mean trains far faster.
    vae_latent_noise: float | None = None
    vae_lr: float = 3e-4
    kl_weight: float = 1e-4  # on the per-element KL; keeps the posterior from collapsing
    dit_batch: int = 32
    dit_lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_drop: float = 0.1  # classifier-free guidance: empty prompt this often
    shift: float = 3.0  # FlowMatchEulerDiscreteScheduler(shift=...) of the exported pipeline
    stat_clips: int = 64  # clips whose VAE latents set latents_mean / latents_std
    moments_dtype: str = "bfloat16"  # Adam moments on disk: bf16 keeps the DiT checkpoint carryable
    save_every_min: float = 3.0
    # Low-resolution DiT phase: (steps, frames, side, batch) trained before the full-size clips, or None.
    dit_low_res: tuple[int, int, int, int] | None = None

    def dit_clips(self, step: int) -> tuple[int, int, int, int]:
        """(frames, height, width, batch) of DiT step ``step``."""
        if self.dit_low_res is not None and step < self.dit_low_res[0]:
            _, frames, side, batch = self.dit_low_res
            return frames, side, side, batch
        return self.frames, self.height, self.width, self.dit_batch


# pipelines/tiny.py's shapes. The VAE trains on whole 25-frame clips: one trained on 9-frame clips only drifted
# (darker, blurrier) on the latent frames it had never seen, when decoding 25 frames.
DEFAULT = Recipe(frames=25, height=128, width=128, vae=dict(VAE_CONFIG), dit=dict(TRANSFORMER_CONFIG),
                 vae_frames=25, vae_batch=4, vae_latent_noise=0.05)

CPU = dataclasses.replace(
    DEFAULT, vae_size=64, vae_batch=2, vae_lr=1e-3, warmup_steps=100,
    dit_batch=4, dit_lr=1e-3, ema_decay=0.995, dit_low_res=(2000, 25, 64, 8), stat_clips=16,
)

SMOKE = dataclasses.replace(
    DEFAULT, frames=5, height=48, width=48, vae_frames=5, vae_size=32, vae_batch=2, dit_batch=2, warmup_steps=2, stat_clips=2,
    moments_dtype="float32", vae=dict(DEFAULT.vae, base_dim=4), dit_low_res=(1, 5, 32, 2), vae_latent_noise=0.05,
    dit=dict(DEFAULT.dit, num_attention_heads=2, attention_head_dim=12, freq_dim=16, ffn_dim=32, num_layers=1),
)

RECIPES = {"h100": DEFAULT, "cpu": CPU, "smoke": SMOKE}


# ---------------------------------------------------------------- components


def build_vae(recipe: Recipe, latents_mean=None, latents_std=None, config: dict | None = None):
    """The recipe's AutoencoderKLWan, or one of ``config`` (what a VAE checkpoint was trained with)."""
    from diffusers import AutoencoderKLWan

    extra = {} if latents_mean is None else dict(latents_mean=list(latents_mean), latents_std=list(latents_std))
    return AutoencoderKLWan(**(config or recipe.vae), **extra)


def build_transformer(recipe: Recipe):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**recipe.dit)


def build_text_encoder(seed: int, vocab_size: int):
    """The frozen random UMT5 of pipelines/tiny.py, drawn from ``seed``."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TEXT_ENCODER_CONFIG)).eval().requires_grad_(False)


def build_pipeline(recipe: Recipe, seed: int, transformer, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(seed, len(tokenizer))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=recipe.shift)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(state: dict, ckpt_dir: Path, name: str) -> None:
    """Write ``state`` as parts below PART_BYTES, then atomically replace the manifest ``name.json``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    parts = []
    for k, start in enumerate(range(0, len(data), PART_BYTES)):
        part = f"{name}-{state['step']:07d}.part{k}"
        atomic_write(ckpt_dir / part, data[start : start + PART_BYTES])
        parts.append(part)
    manifest = dict(name=name, step=state["step"], parts=parts, sha256=hashlib.sha256(data).hexdigest())
    atomic_write(ckpt_dir / f"{name}.json", json.dumps(manifest, indent=1).encode())
    for old in ckpt_dir.glob(f"{name}-*.part*"):
        if old.name not in parts:
            old.unlink()


def load_checkpoint(ckpt_dir: Path, name: str) -> dict | None:
    """The state saved under ``name``, or None when there is none; a corrupt one is an error."""
    manifest_path = ckpt_dir / f"{name}.json"
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    data = b"".join((ckpt_dir / part).read_bytes() for part in manifest["parts"])
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise RuntimeError(f"checkpoint {manifest_path}: parts do not match its sha256; delete it to restart")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def optimizer_state(optimizer, dtype: torch.dtype) -> dict:
    """The optimizer's state dict with its moment tensors cast to ``dtype`` (bf16 halves them)."""
    state = optimizer.state_dict()  # its per-parameter dicts are the live ones: build new ones, never cast in place
    state["state"] = {
        index: {key: value.to(dtype) if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in per_param.items()}
        for index, per_param in state["state"].items()
    }
    return state


def load_optimizer_state(optimizer, state: dict) -> None:
    for per_param in state["state"].values():
        for key, value in per_param.items():
            if torch.is_tensor(value) and value.dim() > 0:
                per_param[key] = value.float()
    optimizer.load_state_dict(state)


# ---------------------------------------------------------------- training pieces


def step_generator(seed: int, stage: str, step: int, device) -> torch.Generator:
    """The only randomness of one training step: a function of (seed, stage, step)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + STAGE_IDS[stage] * 10_007 + step)


def learning_rate(step: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to ``peak``, then constant (runs are cut by time, not by a step count)."""
    return peak * min(1.0, (step + 1) / warmup_steps)


def flow_matching_batch(x0: torch.Tensor, shift: float, generator: torch.Generator):
    """(x_t, sigma, v) for x0 (B, C, T, H, W): x_t = (1 - sigma) x0 + sigma eps, v = eps - x0.

    sigma = shift * u / (1 + (shift - 1) * u), u ~ U(0, 1).
    """
    u = torch.rand(x0.shape[0], device=x0.device, generator=generator)
    sigma = shift * u / (1 + (shift - 1) * u)  # (B,)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    s = sigma.view(-1, 1, 1, 1, 1)
    return (1 - s) * x0 + s * eps, sigma, eps - x0


def vae_loss(vae, video: torch.Tensor, kl_weight: float, generator: torch.Generator, latent_noise: float | None = None):
    """L1 + MSE reconstruction of video (B, 3, T, H, W) in [-1, 1], plus kl_weight * mean KL per latent.

    The decoder sees a posterior sample, or with ``latent_noise`` the posterior mean plus noise of that std.
    """
    posterior = vae.encode(video).latent_dist
    std = posterior.std if latent_noise is None else latent_noise
    z = posterior.mean + std * torch.randn(posterior.mean.shape, device=video.device, generator=generator)
    recon = vae.decode(z).sample
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
    rec = reconstruction_error(recon, video)
    return rec + kl_weight * kl, rec


def reconstruction_error(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean L1 + mean squared error of a reconstruction, in float32."""
    diff = recon.float() - video
    return diff.abs().mean() + diff.pow(2).mean()


@torch.no_grad()
def encode_latents(vae, video: torch.Tensor) -> torch.Tensor:
    """Posterior means (B, z, T', H', W') of video (B, 3, T, H, W), in float32."""
    return vae.encode(video).latent_dist.mode().float()


@torch.no_grad()
def latent_statistics(vae, recipe: Recipe, seed: int, device, autocast) -> tuple[list, list]:
    """Per-channel mean and std of the latents of ``recipe.stat_clips`` training clips."""
    latents = []
    for step in range(max(1, recipe.stat_clips // 8)):
        video, _ = shapes_world.render_batch(_stream(seed, "stats"), step, min(8, recipe.stat_clips),
                                             recipe.frames, recipe.height, recipe.width, device=device)
        with autocast():
            latents.append(encode_latents(vae, video))
    z = torch.cat(latents).transpose(0, 1).flatten(1)  # (z, N)
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


def caption_table(pipe, device) -> dict[str, torch.Tensor]:
    """Embeddings (MAX_TEXT_TOKENS, TEXT_DIM) of every caption of the world and of "", as the pipeline makes them."""
    captions = [c.caption() for c in shapes_world.all_combos()] + [""]
    embeds, _ = pipe.encode_prompt(
        captions, do_classifier_free_guidance=False, max_sequence_length=MAX_TEXT_TOKENS, device=device
    )  # (361, MAX_TEXT_TOKENS, TEXT_DIM)
    return dict(zip(captions, embeds.float()))


def _stream(seed: int, stage: str) -> int:
    return seed * 100 + STAGE_IDS[stage]


@torch.no_grad()
def ema_update(ema: dict, model, decay: float) -> None:
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach().float(), 1 - decay)


# ---------------------------------------------------------------- stages


class Clock:
    """Stops a stage before ``minutes`` run out, leaving room for one more step and a save."""

    def __init__(self, minutes: float, max_steps: int | None):
        self.start = time.monotonic()
        self.deadline = self.start + minutes * 60
        self.max_steps = max_steps
        self.steps = 0
        self.slowest = 0.0

    def more(self) -> bool:
        if self.max_steps is not None and self.steps >= self.max_steps:
            return False
        return time.monotonic() + 2 * self.slowest + 5 < self.deadline

    def tick(self, seconds: float) -> None:
        self.steps += 1
        self.slowest = max(self.slowest, seconds) if self.steps > 2 else self.slowest  # skip compile steps


def train_vae(args, recipe: Recipe, device, autocast) -> dict:
    torch.manual_seed(args.seed)
    vae = build_vae(recipe).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    state = load_checkpoint(args.ckpt_dir, "vae")
    step = 0
    if state is not None and state.get("config", recipe.vae) != recipe.vae:
        raise SystemExit(f"--ckpt-dir {args.ckpt_dir}: its VAE was trained with {state['config']}, not {recipe.vae}; "
                         "give the same --vae-base-dim, or another --ckpt-dir")
    if state is not None:
        vae.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        step = state["step"]
    clock, last_save = Clock(args.minutes, args.steps), time.monotonic()
    while clock.more():
        t0 = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe.vae_lr, recipe.warmup_steps)
        side = recipe.vae_size or recipe.height
        video, _ = shapes_world.render_batch(_stream(args.seed, "vae"), step, recipe.vae_batch, recipe.vae_frames, side,
                                             side * recipe.width // recipe.height, device=device)
        with autocast():
            loss, rec = vae_loss(vae, video, recipe.kl_weight, step_generator(args.seed, "vae", step, device),
                                 recipe.vae_latent_noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        clock.tick(time.monotonic() - t0)
        _log(args, "vae", step, rec=rec.item(), s_per_step=time.monotonic() - t0)
        if time.monotonic() - last_save > recipe.save_every_min * 60:
            _save_vae(args, recipe, vae, optimizer, step)
            last_save = time.monotonic()
    _save_vae(args, recipe, vae, optimizer, step)
    return dict(stage="vae", step=step, steps_this_call=clock.steps, seconds=round(time.monotonic() - clock.start, 1))


def _save_vae(args, recipe, vae, optimizer, step):
    moments = getattr(torch, recipe.moments_dtype)
    state = dict(step=step, seed=args.seed, model=vae.state_dict(), optimizer=optimizer_state(optimizer, moments),
                 config=dict(recipe.vae))  # later stages build the VAE from this, whatever flags they get
    save_checkpoint(state, args.ckpt_dir, "vae")


def train_dit(args, recipe: Recipe, device, autocast) -> dict:
    vae_state = load_checkpoint(args.ckpt_dir, "vae")
    if vae_state is None:
        raise SystemExit(f"--ckpt-dir {args.ckpt_dir}: no vae.json there; run --stage vae first")
    vae = build_vae(recipe, config=vae_state.get("config")).to(device).eval().requires_grad_(False)
    vae.load_state_dict(vae_state["model"])
    torch.manual_seed(args.seed + 2)
    transformer = build_transformer(recipe).to(device).train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=recipe.dit_lr, betas=(0.9, 0.99), weight_decay=0.01)
    state = load_checkpoint(args.ckpt_dir, "dit")
    if state is None:
        mean, std = latent_statistics(vae, recipe, args.seed, device, autocast)
        ema = {n: p.detach().float().clone() for n, p in transformer.named_parameters()}
        step = 0
    else:
        transformer.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        ema = {n: t.to(device) for n, t in state["ema"].items()}
        mean, std, step = state["latents_mean"], state["latents_std"], state["step"]
    pipe = build_pipeline(recipe, args.seed, transformer, vae).to(device)
    table = caption_table(pipe, device)
    forward = torch.compile(transformer) if args.compile else transformer
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1, 1)
    clock, last_save = Clock(args.minutes, args.steps), time.monotonic()
    while clock.more():
        t0 = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe.dit_lr, recipe.warmup_steps)
        generator = step_generator(args.seed, "dit", step, device)
        frames, height, width, batch = recipe.dit_clips(step)
        video, captions = shapes_world.render_batch(_stream(args.seed, "dit"), step, batch, frames, height, width,
                                                    device=device)
        with autocast():
            x0 = (encode_latents(vae, video) - mean_t) / std_t  # (B, 16, T', H', W')
        drop = torch.rand(len(captions), device=device, generator=generator) < recipe.caption_drop
        text = torch.stack([table["" if d else c] for c, d in zip(captions, drop.tolist())])  # (B, L, TEXT_DIM)
        x_t, sigma, v = flow_matching_batch(x0, recipe.shift, generator)
        with autocast():
            pred = forward(x_t, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), v)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, transformer, min(recipe.ema_decay, (1 + step) / (10 + step)))
        step += 1
        clock.tick(time.monotonic() - t0)
        _log(args, "dit", step, loss=loss.item(), s_per_step=time.monotonic() - t0)
        if time.monotonic() - last_save > recipe.save_every_min * 60:
            _save_dit(args, recipe, transformer, optimizer, ema, mean, std, step)
            last_save = time.monotonic()
    _save_dit(args, recipe, transformer, optimizer, ema, mean, std, step)
    return dict(stage="dit", step=step, steps_this_call=clock.steps, seconds=round(time.monotonic() - clock.start, 1))


def _save_dit(args, recipe, transformer, optimizer, ema, mean, std, step):
    moments = getattr(torch, recipe.moments_dtype)
    state = dict(
        step=step, seed=args.seed, model=transformer.state_dict(), optimizer=optimizer_state(optimizer, moments),
        ema={n: t.cpu() for n, t in ema.items()}, latents_mean=mean, latents_std=std,
    )
    save_checkpoint(state, args.ckpt_dir, "dit")


def export(args, recipe: Recipe) -> dict:
    """A WanPipeline directory: EMA transformer, trained VAE with its latent statistics, frozen UMT5."""
    vae_state, dit_state = load_checkpoint(args.ckpt_dir, "vae"), load_checkpoint(args.ckpt_dir, "dit")
    if vae_state is None or dit_state is None:
        raise SystemExit(f"--ckpt-dir {args.ckpt_dir}: needs vae.json and dit.json; train both stages first")
    vae = build_vae(recipe, dit_state["latents_mean"], dit_state["latents_std"], vae_state.get("config")).eval()
    vae.load_state_dict(vae_state["model"])
    transformer = build_transformer(recipe).eval()
    transformer.load_state_dict(dit_state["model"])
    transformer.load_state_dict(dit_state["ema"], strict=False)  # the EMA holds parameters only
    pipe = build_pipeline(recipe, args.seed, transformer, vae)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    provenance = dict(seed=args.seed, vae_steps=vae_state["step"], dit_steps=dit_state["step"], smoke=args.smoke,
                      recipe=dataclasses.asdict(recipe))
    atomic_write_json(args.out / "training.json", provenance)
    size_mb = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 2**20
    if size_mb > MAX_EXPORT_MB:
        raise SystemExit(f"export {args.out}: {size_mb:.1f} MiB, over the {MAX_EXPORT_MB} MiB budget")
    return dict(stage="export", out=str(args.out), size_mb=round(size_mb, 2), **provenance)


@torch.no_grad()
def evaluate(args, recipe: Recipe, device) -> dict:
    """Prompt following and svg head classes of the exported pipeline, at the product's default settings.

    Writes ``<out>/eval.json``: per split in ``--eval-splits`` the rates of prompt_following_accuracy over
    ``--eval-clips`` prompts (and each clip's detections), then, over ``--svg-clips`` held-out prompts, the
    share of spatial / temporal / dense heads per layer that ``attention="svg"`` chose.
    """
    from diffusers import WanPipeline

    import vdit_sparse
    from vdit_sparse.quality.prompt_following import accuracy_of, prompt_following

    if not (args.out / "model_index.json").exists():
        raise SystemExit(f"--out {args.out}: no model_index.json there; run --stage export first")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = WanPipeline.from_pretrained(args.out, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt: str, seed: int):
        frames = pipe(prompt, num_frames=recipe.frames, height=recipe.height, width=recipe.width,
                      num_inference_steps=args.eval_steps, guidance_scale=args.guidance_scale,
                      max_sequence_length=MAX_TEXT_TOKENS, output_type="np",
                      generator=torch.Generator(device).manual_seed(seed)).frames[0]  # (T, H, W, 3) in [0, 1]
        return (frames * 255).round().clip(0, 255).astype("uint8")

    report = dict(steps=args.eval_steps, guidance_scale=args.guidance_scale, seed=args.seed)
    for split in args.eval_splits:
        prompts = [c.caption() for c in shapes_world.combos(split)]
        samples = []
        for i in range(args.eval_clips):
            samples.append((generate(prompts[i % len(prompts)], args.seed + i), prompts[i % len(prompts)]))
            print(f"eval {split} {i + 1}/{args.eval_clips}", flush=True)
        results = [prompt_following(frames, prompt) for frames, prompt in samples]
        clips = [dict(prompt=prompt, **{k: _plain(v) for k, v in found.items()}) for (_, prompt), found in zip(samples, results)]
        report[split] = dict(accuracy_of(results), clips=clips)
        _write_strip(args.out / f"eval-{split}.png", samples[:8])
    handle = vdit_sparse.accelerate(pipe, attention="svg", density=0.25, warmup_steps=0.25)  # configs/attention/svg.yaml
    try:
        prompts = [c.caption() for c in shapes_world.combos("heldout")][: args.svg_clips]
        table = []
        for i, prompt in enumerate(prompts):
            generate(prompt, args.seed + i)
            table += handle.stats()  # the latest run's calls
        report["svg_head_shares"] = head_shares_by_layer(table)
    finally:
        handle.remove()
    atomic_write_json(args.out / "eval.json", report)
    return dict(stage="eval", **{k: v for k, v in report.items() if k not in args.eval_splits},
                **{split: {k: v for k, v in report[split].items() if k != "clips"} for split in args.eval_splits})


def head_shares_by_layer(table: list[dict]) -> dict[str, dict[str, float]]:
    """Mean share of spatial / temporal / dense heads per layer over svg's sparse calls (warm-up excluded)."""
    by_layer: dict[str, list[dict]] = {}
    for row in table:
        if row.get("method") == "svg" and "spatial" in row:
            by_layer.setdefault(str(row["layer"]), []).append(row)
    return {
        layer: {k: round(sum(r[k] for r in rows) / len(rows), 3) for k in ("spatial", "temporal", "dense", "density")}
        for layer, rows in sorted(by_layer.items(), key=lambda item: int(item[0]))
    }


def _plain(value):
    """A numpy scalar as the Python value JSON writes (np.bool_ and np.int64 are not JSON types)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _write_strip(path: Path, samples) -> None:
    """A PNG to look at: one row per clip, every third frame."""
    import numpy as np
    from PIL import Image

    rows = [np.concatenate(list(frames[::3]), axis=1) for frames, _ in samples]
    png = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(png, format="PNG")
    atomic_write(path, png.getvalue())


def check_decoder(args, recipe: Recipe, device, autocast) -> dict:
    """Can the VAE's decoder learn at this size? Train it alone for ``--steps`` steps (single frames, batch 16)
    on the easiest latent there is, the average-pooled image (3 of the latent channels), and report the
    L1 error on held-out object pixels and background pixels before and after.

    On CPU the decoder of VAE_CONFIG stayed at object L1 0.62-0.69 after 150-230 steps while a plain
    2-D conv autoencoder reached 0.28 after 50, and the same decoder with its per-position channel RMS
    norm swapped (in an experiment only) for a channel-and-space normalisation reached 0.39 after 172
    (docs/embedded_model.md). Run this before training; ``--vae-base-dim`` tries other widths.
    Writes nothing.
    """
    torch.manual_seed(args.seed)
    vae = build_vae(recipe).to(device).train()
    optimizer = torch.optim.AdamW(vae.decoder.parameters(), lr=recipe.vae_lr, betas=(0.9, 0.99))
    side, factor, z_dim = recipe.vae_size or recipe.height, recipe.vae["scale_factor_spatial"], recipe.vae["z_dim"]

    def images(stream: int, step: int, n: int) -> torch.Tensor:
        video, _ = shapes_world.render_batch(stream, step, n, 2, side, side, device=device)
        return video[:, :, :1]  # (n, 3, 1, side, side): first frames

    def decode_pooled(video: torch.Tensor) -> torch.Tensor:
        z = F.avg_pool3d(video, (1, factor, factor)) * 2
        z = torch.cat([z, z.new_zeros(z.shape[0], z_dim - 3, *z.shape[2:])], dim=1)
        return vae.decode(z).sample.float()

    held = images(_stream(args.seed, "vae") + 7, 0, 16)
    objects = ((held.amax(1) - held.amin(1)) / 2 > 0.5).unsqueeze(1).expand_as(held)  # saturated pixels

    @torch.no_grad()
    def errors() -> dict:
        with autocast():
            err = (decode_pooled(held) - held).abs()
        return dict(object_l1=round(err[objects].mean().item(), 4), background_l1=round(err[~objects].mean().item(), 4))

    before, t0 = errors(), time.monotonic()
    steps = args.steps or 300
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe.vae_lr, min(recipe.warmup_steps, steps // 4 + 1))
        video = images(_stream(args.seed, "vae") + 5, step, 16)
        with autocast():
            recon = decode_pooled(video)
        loss = reconstruction_error(recon, video)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = errors()
    return dict(stage="decoder-check", steps=steps, seconds=round(time.monotonic() - t0, 1), before=before, after=after,
                learns=after["object_l1"] < 0.35)


# ---------------------------------------------------------------- command line


def _log(args, stage: str, step: int, **values) -> None:
    if step % args.log_every == 0:
        print(f"{stage} step {step} " + " ".join(f"{k} {v:.4f}" for k, v in values.items()), flush=True)


def parse_args(argv=None):
    from vdit_sparse.pipelines.tiny import packaged_weights_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--ckpt-dir", type=Path, required=True, help="checkpoints; a stage resumes from what it finds here")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this call's training loop")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps in this call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=packaged_weights_dir(), help="export: the pipeline directory")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="h100",
                   help="h100: full-size clips throughout; cpu: 64-pixel VAE crops and a low-resolution DiT phase")
    p.add_argument("--smoke", action="store_true", help="micro scale (32x32, 5 frames, tiny models) for CPU tests")
    p.add_argument("--vae-base-dim", type=int, help="override the VAE's base_dim (vae and decoder-check stages; later "
                   "stages read it from the VAE checkpoint), e.g. to find the smallest width whose decoder learns")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (CUDA)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-clips", type=int, default=36, help="eval: clips per split")
    p.add_argument("--eval-splits", nargs="+", choices=("heldout", "train"), default=["heldout"],
                   help="eval: which prompt sets to generate from")
    p.add_argument("--svg-clips", type=int, default=2, help="eval: held-out clips generated with attention='svg'")
    p.add_argument("--eval-steps", type=int, default=10, help="eval: denoising steps per clip (configs/model/tiny.yaml)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="eval: classifier-free guidance scale")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error(f"--minutes {args.minutes}: must be > 0")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1")
    if args.vae_base_dim is not None and (args.vae_base_dim < 4 or args.vae_base_dim % 4):
        p.error(f"--vae-base-dim {args.vae_base_dim}: must be a multiple of 4, at least 4")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.smoke:  # micro tensors gain nothing from threads, and a busy CPU makes them thrash
        torch.set_num_threads(1)
    try:
        result = run_stage(args)
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(result, default=str), flush=True)
    return result


def run_stage(args) -> dict:
    recipe = SMOKE if args.smoke else RECIPES[args.recipe]
    if args.vae_base_dim is not None:
        recipe = dataclasses.replace(recipe, vae=dict(recipe.vae, base_dim=args.vae_base_dim))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda)  # noqa: E731
    if args.stage == "export":
        return export(args, recipe)
    if args.stage == "eval":
        return evaluate(args, recipe, device)
    if args.stage == "decoder-check":
        return check_decoder(args, recipe, device, autocast)
    train = train_vae if args.stage == "vae" else train_dit
    return train(args, recipe, device, autocast)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
