"""Train the embedded default model on the shapes world, on a CPU: fit the autoencoder, train the DiT, export.

    python scripts/train_tiny.py --stage vae --ckpt-dir ckpt                   # fit the patch PCA (seconds)
    python scripts/train_tiny.py --stage dit --minutes 140 --ckpt-dir ckpt     # resumes if ckpt/dit.json exists
    python scripts/train_tiny.py --stage export --ckpt-dir ckpt --out vdit_sparse/data/tiny
    python scripts/train_tiny.py --stage eval --ckpt-dir ckpt --out vdit_sparse/data/tiny   # prompt following
    python scripts/train_tiny.py --stage dit --init-from vdit_sparse/data/tiny --ckpt-dir more   # continue the shipped model
    python scripts/train_tiny.py --smoke --stage vae --ckpt-dir /tmp/c         # micro scale, for tests

The autoencoder is ``PatchPCAAutoencoder`` (pipelines/patch_vae.py): a fixed linear map of 8 x 8 pixel
x 4 frame patches to 16 channels, fitted in seconds; nothing in it trains. The DiT is the real
``WanTransformer3DModel`` of pipelines/tiny.py. Recipes: ``cpu`` (the default: one thread, batch 8,
what the shipped weights were trained with) and ``gpu`` (the same model and data, batch 32).

Flow matching, in diffusers' FlowMatchEulerDiscreteScheduler convention (read in its ``step``:
x_prev = x + (sigma_next - sigma) * model_output, and x0 = x - sigma * model_output):
    x_t = (1 - sigma) * x0 + sigma * eps,   target v = eps - x0,   timestep = 1000 * sigma,
with sigma = shift * u / (1 + (shift - 1) * u), u ~ U(0, 1): the scheduler's own shift, so
training sees noise levels with the density inference visits.

Data: a pool of ``pool_clips`` training clips, rendered when first needed and kept as latents in
memory (rendering costs about a third of a CPU step); each epoch visits the pool in an order drawn
from (seed, epoch). Reproducible from ``--seed``: step ``s`` draws its clips and its noise from
(seed, s) alone, so a run cut into resumed calls sees the same data as one long run, and no
random-generator state needs saving. Checkpoints: ``DIR/<stage>.json`` names the parts
``DIR/<stage>-<step>.partK`` (each below 15 MiB); the manifest is replaced last, atomically, so a
cut-off save leaves the previous checkpoint readable.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vdit_sparse import shapes_world
from vdit_sparse.atomicfile import atomic_write, atomic_write_json
from vdit_sparse.pipelines.tiny import MAX_TEXT_TOKENS, TEXT_ENCODER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, build_tokenizer

STAGES = ("vae", "dit", "export", "eval", "sampling")
STAGE_IDS = {"vae": 1, "dit": 2, "stats": 3}
PART_BYTES = 15 * 2**20
MAX_EXPORT_MB = 40


@dataclass(frozen=True)
class Recipe:
    """Sizes and optimisation settings of one training scale."""

    frames: int  # of a training clip (4k + 1)
    height: int
    width: int
    vae: dict = field(default_factory=dict)  # PatchPCAAutoencoder's config
    dit: dict = field(default_factory=dict)  # WanTransformer3DModel's config
    vae_fit_clips: int = 320  # clips whose patches fit the PCA
    dit_batch: int = 8
    dit_lr: float = 1e-3
    warmup_steps: int = 200
    total_steps: int = 7000  # the schedule's length: the rate decays linearly over its last decay_fraction
    decay_fraction: float = 0.3
    final_lr_fraction: float = 0.1
    ema_decay: float = 0.999
    caption_drop: float = 0.1  # classifier-free guidance: empty prompt this often
    shift: float = 3.0  # FlowMatchEulerDiscreteScheduler(shift=...) of the exported pipeline
    pool_clips: int = 24_000  # training clips kept as latents (fp16: 57 KiB each at 25 x 128 x 128)
    save_every_min: float = 5.0


CPU = Recipe(frames=25, height=128, width=128, vae=dict(VAE_CONFIG), dit=dict(TRANSFORMER_CONFIG))
GPU = dataclasses.replace(CPU, dit_batch=32, dit_lr=5e-4, total_steps=6000, pool_clips=60_000)
SMOKE = dataclasses.replace(
    CPU, frames=5, height=64, width=64, vae_fit_clips=4, dit_batch=2, warmup_steps=2, total_steps=10, pool_clips=6,
    dit=dict(TRANSFORMER_CONFIG, num_attention_heads=2, attention_head_dim=12, freq_dim=16, ffn_dim=32, num_layers=1),
)
# tiny-long: the shipped model fine-tuned at 97 frames (25 latent frames x 64 = 1,600 tokens), one CPU thread.
# A fine-tune: lower peak rate, short warm-up, a faster EMA (time constant ~200 steps) so the export
# reflects the new shape within a run of ~2,000 steps; fewer pooled clips (each is 3.6x larger).
LONG = dataclasses.replace(
    CPU, frames=97, dit_batch=4, dit_lr=3e-4, warmup_steps=50, total_steps=2000, ema_decay=0.995, pool_clips=8000,
    save_every_min=4.0,
)
RECIPES = {"cpu": CPU, "gpu": GPU, "long": LONG, "smoke": SMOKE}


# ---------------------------------------------------------------- components


def build_vae(config: dict):
    from vdit_sparse.pipelines.patch_vae import PatchPCAAutoencoder

    return PatchPCAAutoencoder(**config)


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


# ---------------------------------------------------------------- training pieces


def step_generator(seed: int, stage: str, step: int, device) -> torch.Generator:
    """The only randomness of one training step: a function of (seed, stage, step)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + STAGE_IDS[stage] * 10_007 + step)


def learning_rate(step: int, recipe: Recipe, peak: float | None = None) -> float:
    """Linear warm-up to the peak, constant, then a linear decay to final_lr_fraction over the schedule's end."""
    peak = recipe.dit_lr if peak is None else peak
    warm = min(1.0, (step + 1) / recipe.warmup_steps)
    decay_start = recipe.total_steps * (1 - recipe.decay_fraction)
    progress = min(1.0, max(0.0, step - decay_start) / max(1.0, recipe.total_steps - decay_start))
    return peak * warm * (1 - (1 - recipe.final_lr_fraction) * progress)


def flow_matching_batch(x0: torch.Tensor, shift: float, generator: torch.Generator):
    """(x_t, sigma, v) for x0 (B, C, T, H, W): x_t = (1 - sigma) x0 + sigma eps, v = eps - x0.

    sigma = shift * u / (1 + (shift - 1) * u), u ~ U(0, 1).
    """
    u = torch.rand(x0.shape[0], device=x0.device, generator=generator)
    sigma = shift * u / (1 + (shift - 1) * u)  # (B,)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    s = sigma.view(-1, 1, 1, 1, 1)
    return (1 - s) * x0 + s * eps, sigma, eps - x0


class LatentPool:
    """Training clips of the stream ``seed`` as normalised latents, rendered once when first drawn.

    Step ``s`` takes samples ``s * batch ... (s + 1) * batch - 1`` of an endless sequence that visits
    the pool's clips once per epoch in an order drawn from (seed, epoch).
    """

    def __init__(self, vae, recipe: Recipe, seed: int, device):
        self.vae, self.recipe, self.seed, self.device = vae, recipe, seed, device
        self.latents: dict[int, torch.Tensor] = {}  # clip index -> (C, T', H', W') fp16, normalised
        self.captions: dict[int, str] = {}
        self.mean = torch.tensor(vae.config.latents_mean, device=device).view(-1, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, device=device).view(-1, 1, 1, 1)
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._orders = {epoch: torch.randperm(self.recipe.pool_clips, generator=g)}
        return self._orders[epoch]

    def clips_of(self, step: int, batch: int) -> list[int]:
        size = self.recipe.pool_clips
        return [int(self._order(i // size)[i % size]) for i in range(step * batch, (step + 1) * batch)]

    @torch.no_grad()
    def batch(self, step: int, batch: int) -> tuple[torch.Tensor, list[str]]:
        """Normalised latents (B, C, T', H', W') float32 and captions of step ``step``."""
        indices = self.clips_of(step, batch)
        missing = [i for i in dict.fromkeys(indices) if i not in self.latents]
        if missing:
            r = self.recipe
            specs = [shapes_world.sample_clip_spec(self.seed, i, r.frames, r.height, r.width) for i in missing]
            video, _ = shapes_world.render_specs(specs, r.frames, r.height, r.width, device=self.device)
            z = self.vae.encode(video.permute(0, 4, 1, 2, 3) * 2 - 1).latent_dist.mode()  # (b, C, T', H', W')
            for i, spec, latent in zip(missing, specs, z):
                self.latents[i] = ((latent - self.mean) / self.std).half()
                self.captions[i] = spec.combo.caption()
        return torch.stack([self.latents[i] for i in indices]).float(), [self.captions[i] for i in indices]


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


def fit_vae(args, recipe: Recipe, device) -> dict:
    """Fit the patch PCA on ``vae_fit_clips`` training clips and save it as the ``vae`` checkpoint."""
    if load_checkpoint(args.ckpt_dir, "vae") is not None:
        raise SystemExit(f"--ckpt-dir {args.ckpt_dir}: holds a fitted vae already; the DiT trained on it needs it as is")
    vae = build_vae(recipe.vae).to(device)
    t0 = time.monotonic()
    batches = (shapes_world.render_batch(_stream(args.seed, "vae"), step, 8, recipe.frames, recipe.height,
                                         recipe.width, device=device)[0]
               for step in range(max(1, recipe.vae_fit_clips // 8)))
    info = vae.fit(batches)
    save_checkpoint(dict(step=0, seed=args.seed, model=vae.state_dict(), config=vae.init_config()), args.ckpt_dir, "vae")
    return dict(stage="vae", seconds=round(time.monotonic() - t0, 1), **{k: round(v, 4) for k, v in info.items()})


def load_vae(ckpt_dir: Path):
    state = load_checkpoint(ckpt_dir, "vae")
    if state is None:
        raise SystemExit(f"--ckpt-dir {ckpt_dir}: no vae.json there; run --stage vae first")
    vae = build_vae({k: v for k, v in state["config"].items() if not k.startswith("_")}).eval()
    vae.load_state_dict(state["model"])
    return vae


def init_from_pipeline(args, recipe: Recipe, transformer) -> None:
    """Start a new run from a shipped pipeline directory: its transformer, and its autoencoder as the vae checkpoint."""
    from diffusers import WanTransformer3DModel

    from vdit_sparse.pipelines.patch_vae import PatchPCAAutoencoder

    if not (args.init_from / "model_index.json").is_file():
        raise SystemExit(f"--init-from {args.init_from}: not a pipeline directory (no model_index.json)")
    shipped = WanTransformer3DModel.from_pretrained(args.init_from / "transformer")
    transformer.load_state_dict(shipped.state_dict())
    if load_checkpoint(args.ckpt_dir, "vae") is None:
        vae = PatchPCAAutoencoder.from_pretrained(args.init_from / "vae")
        save_checkpoint(dict(step=0, seed=args.seed, model=vae.state_dict(), config=vae.init_config()), args.ckpt_dir, "vae")


def train_dit(args, recipe: Recipe, device) -> dict:
    torch.manual_seed(args.seed + 2)
    transformer = build_transformer(recipe).to(device).train()
    state = load_checkpoint(args.ckpt_dir, "dit")
    if state is None and args.init_from is not None:
        init_from_pipeline(args, recipe, transformer)
    vae = load_vae(args.ckpt_dir).to(device)
    peak = args.lr or recipe.dit_lr
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=peak, betas=(0.9, 0.99), weight_decay=0.01)
    if state is None:
        ema = {n: p.detach().float().clone() for n, p in transformer.named_parameters()}
        step, losses = 0, []
    else:
        transformer.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        ema = {n: t.to(device) for n, t in state["ema"].items()}
        step, losses = state["step"], state.get("losses", [])
    pipe = build_pipeline(recipe, args.seed, transformer, vae).to(device)
    table = caption_table(pipe, device)
    pool = LatentPool(vae, recipe, _stream(args.seed, "dit"), device)
    forward = torch.compile(transformer) if args.compile else transformer
    clock, last_save, window = Clock(args.minutes, args.steps), time.monotonic(), []
    while clock.more():
        t0 = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe, peak)
        generator = step_generator(args.seed, "dit", step, device)
        x0, captions = pool.batch(step, recipe.dit_batch)  # (B, 16, T', H', W')
        drop = torch.rand(len(captions), device=device, generator=generator) < recipe.caption_drop
        text = torch.stack([table["" if d else c] for c, d in zip(captions, drop.tolist())])  # (B, L, TEXT_DIM)
        x_t, sigma, v = flow_matching_batch(x0, recipe.shift, generator)
        pred = forward(x_t, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), v)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, transformer, min(recipe.ema_decay, (1 + step) / (10 + step)))
        step += 1
        window.append(loss.item())
        if len(window) == 50:  # the loss curve of the model card: one mean per 50 steps
            losses.append([step, round(sum(window) / len(window), 5), round(time.monotonic() - clock.start, 1)])
            window = []
        clock.tick(time.monotonic() - t0)
        _log(args, "dit", step, loss=loss.item(), lr=learning_rate(step - 1, recipe, peak), s_per_step=time.monotonic() - t0)
        if time.monotonic() - last_save > recipe.save_every_min * 60:
            _save_dit(args, transformer, optimizer, ema, step, losses)
            last_save = time.monotonic()
    _save_dit(args, transformer, optimizer, ema, step, losses)
    return dict(stage="dit", step=step, steps_this_call=clock.steps, seconds=round(time.monotonic() - clock.start, 1))


def _save_dit(args, transformer, optimizer, ema, step, losses):
    state = dict(step=step, seed=args.seed, model=transformer.state_dict(), optimizer=optimizer_state(optimizer, torch.float32),
                 ema={n: t.cpu() for n, t in ema.items()}, losses=losses)
    save_checkpoint(state, args.ckpt_dir, "dit")


def export(args, recipe: Recipe) -> dict:
    """A WanPipeline directory: EMA transformer, the fitted autoencoder, frozen UMT5."""
    dit_state = load_checkpoint(args.ckpt_dir, "dit")
    if dit_state is None:
        raise SystemExit(f"--ckpt-dir {args.ckpt_dir}: needs dit.json; run --stage dit first")
    vae = load_vae(args.ckpt_dir)
    transformer = build_transformer(recipe).eval()
    transformer.load_state_dict(dit_state["model"])
    transformer.load_state_dict(dit_state["ema"], strict=False)  # the EMA holds parameters only
    pipe = build_pipeline(recipe, args.seed, transformer, vae)
    if args.sample_shift is not None:  # chosen by --stage sampling; training drew sigma with recipe.shift
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=args.sample_shift)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    provenance = dict(seed=args.seed, dit_steps=dit_state["step"], smoke=args.smoke, recipe=dataclasses.asdict(recipe),
                      loss_curve=dit_state.get("losses", []))
    atomic_write_json(args.out / "training.json", provenance)
    size_mb = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 2**20
    if size_mb > MAX_EXPORT_MB:
        raise SystemExit(f"export {args.out}: {size_mb:.1f} MiB, over the {MAX_EXPORT_MB} MiB budget")
    return dict(stage="export", out=str(args.out), size_mb=round(size_mb, 2), dit_steps=dit_state["step"])


@torch.no_grad()
def evaluate(args, recipe: Recipe, device) -> dict:
    """Prompt following and svg head classes of the exported pipeline, at the product's default settings.

    Writes ``<out>/eval.json``: per split in ``--eval-splits`` the rates of prompt_following_accuracy over
    ``--eval-clips`` prompts (and each clip's detections), then, over ``--svg-clips`` held-out prompts, the
    share of spatial / temporal / dense heads per layer that ``attention="svg"`` chose, svg2's realised density
    and the dense attention's entropy (:func:`attention_structure`).
    """
    from diffusers import WanPipeline

    from vdit_sparse.pipelines import patch_vae  # noqa: F401  lets from_pretrained load the vae's class
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
    report.update(attention_structure(pipe, generate, [c.caption() for c in shapes_world.combos("heldout")][: args.svg_clips],
                                      args.seed))
    atomic_write_json(args.out / "eval.json", report)
    return dict(stage="eval", **{k: v for k, v in report.items() if k not in args.eval_splits},
                **{split: {k: v for k, v in report[split].items() if k != "clips"} for split in args.eval_splits})


def attention_structure(pipe, generate, prompts: list[str], seed: int) -> dict:
    """Per layer, what the trained model's self-attention looks like to the sparse methods, over ``prompts``:
    the mean entropy of a dense run's attention rows relative to uniform (1.0: no structure), svg's head shares
    (spatial / temporal / dense) and svg2's realised density at its defaults (top_p 0.9), warm-up excluded."""
    import vdit_sparse
    from vdit_sparse.stats import density_by_layer

    entropy: dict[str, list[float]] = {}

    def observe(ctx, q, k, v, out, forced_dense):  # (B, H, N, D): rows' entropy over log N
        probs = (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        h = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / math.log(q.shape[2])
        entropy.setdefault(str(ctx.layer), []).append(float(h.mean()))

    out = {}
    for attention in ("dense", "svg", "svg2"):
        handle = vdit_sparse.accelerate(pipe, attention=attention)
        if attention == "dense":
            handle.observe(observe)
        try:
            table = []
            for i, prompt in enumerate(prompts):
                generate(prompt, seed + i)
                table += handle.stats()  # the latest run's calls
        finally:
            handle.remove()
        if attention == "svg":
            out["svg_head_shares"] = head_shares_by_layer(table)
        elif attention == "svg2":
            # over svg2's own calls: the warm-up steps, which run dense, left out
            by_layer = density_by_layer([row for row in table if row.get("method") == "svg2"])
            out["svg2_density"] = {key.split(".")[-1]: round(v, 4) for key, v in by_layer.items()}
    out["attention_entropy"] = {layer: round(sum(v) / len(v), 4) for layer, v in sorted(entropy.items(), key=lambda i: int(i[0]))}
    return out


@torch.no_grad()
def sweep_sampling(args, recipe: Recipe, device) -> dict:
    """Prompt following of the exported pipeline per (guidance scale, scheduler shift), on training-split
    prompts (the held-out ones stay for the final eval): what the shipped defaults are chosen from.
    Writes ``<out>/sampling.json``; the pipeline on disk is not changed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from vdit_sparse.pipelines import patch_vae  # noqa: F401  lets from_pretrained load the vae's class
    from vdit_sparse.quality.prompt_following import accuracy_of, prompt_following

    pipe = WanPipeline.from_pretrained(args.out).to(device)
    pipe.set_progress_bar_config(disable=True)
    train = [c.caption() for c in shapes_world.combos("train")]
    prompts = [train[i * 37 % len(train)] for i in range(args.eval_clips)]  # spread over the split
    rows = []
    for shift in args.shifts:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        for scale in args.guidance_scales:
            results = []
            for i, prompt in enumerate(prompts):
                frames = pipe(prompt, num_frames=recipe.frames, height=recipe.height, width=recipe.width,
                              num_inference_steps=args.eval_steps, guidance_scale=scale, max_sequence_length=MAX_TEXT_TOKENS,
                              output_type="np", generator=torch.Generator(device).manual_seed(args.seed + i)).frames[0]
                results.append(prompt_following((frames * 255).round().clip(0, 255).astype("uint8"), prompt))
            rows.append(dict(shift=shift, guidance_scale=scale, **accuracy_of(results)))
            print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(args.out / "sampling.json", dict(steps=args.eval_steps, prompts=prompts, rows=rows))
    best = max(rows, key=lambda r: (r["all_accuracy"], r["motion_accuracy"] or 0))
    return dict(stage="sampling", best=best)


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


# ---------------------------------------------------------------- command line


def _log(args, stage: str, step: int, **values) -> None:
    if step % args.log_every == 0:
        print(f"{stage} step {step} " + " ".join(f"{k} {v:.4g}" for k, v in values.items()), flush=True)


def parse_args(argv=None):
    from vdit_sparse.pipelines.tiny import packaged_weights_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--ckpt-dir", type=Path, required=True, help="checkpoints; a stage resumes from what it finds here")
    p.add_argument("--minutes", type=float, default=140.0, help="wall-clock budget of this call's training loop")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps in this call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=packaged_weights_dir(), help="export/eval: the pipeline directory")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="cpu",
                   help="cpu: one thread, batch 8 (the shipped weights); gpu: batch 32")
    p.add_argument("--smoke", action="store_true", help="micro scale (64x64, 5 frames, a 1-layer DiT) for CPU tests")
    p.add_argument("--init-from", type=Path, default=None,
                   help="dit: start a new --ckpt-dir from a pipeline directory (e.g. the shipped weights)")
    p.add_argument("--lr", type=float, default=None, help="dit: peak learning rate (default: the recipe's)")
    p.add_argument("--total-steps", type=int, default=None, help="dit: length of the rate schedule (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one leaves the other core free)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (about 10%% faster on CPU)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-clips", type=int, default=36, help="eval: clips per split")
    p.add_argument("--eval-splits", nargs="+", choices=("heldout", "train"), default=["heldout"],
                   help="eval: which prompt sets to generate from")
    p.add_argument("--svg-clips", type=int, default=2,
                   help="eval: held-out clips for the attention structure (dense entropy, svg head shares, svg2 density)")
    p.add_argument("--eval-steps", type=int, default=10, help="eval: denoising steps per clip (configs/model/tiny.yaml)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="eval: classifier-free guidance scale")
    p.add_argument("--guidance-scales", nargs="+", type=float, default=[2.0, 3.5, 5.0], help="sampling: the grid")
    p.add_argument("--shifts", nargs="+", type=float, default=[1.0, 3.0], help="sampling: scheduler shifts tried")
    p.add_argument("--sample-shift", type=float, default=None,
                   help="export: the shipped scheduler's shift (default: the training shift)")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error(f"--minutes {args.minutes}: must be > 0")
    for name in ("steps", "total_steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.lr is not None and not 0 < args.lr < 1:
        p.error(f"--lr {args.lr}: must be in (0, 1)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run_stage(args)
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(result, default=str), flush=True)
    return result


def run_stage(args) -> dict:
    recipe = SMOKE if args.smoke else RECIPES[args.recipe]
    if args.total_steps is not None:
        recipe = dataclasses.replace(recipe, total_steps=args.total_steps)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.stage == "vae":
        return fit_vae(args, recipe, device)
    if args.stage == "export":
        return export(args, recipe)
    if args.stage == "eval":
        return evaluate(args, recipe, device)
    if args.stage == "sampling":
        return sweep_sampling(args, recipe, device)
    return train_dit(args, recipe, device)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
