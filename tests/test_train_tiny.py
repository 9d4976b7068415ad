"""scripts/train_tiny.py at micro scale: both stages resume from checkpoints, export loads in WanPipeline."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"


@pytest.fixture(scope="module")
def train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("train_tiny", None)


def run(train_tiny, *argv):
    return train_tiny.main(["--smoke", "--log-every", "1000", *map(str, argv)])


def test_stages_resume_and_export_loads_as_a_wan_pipeline(train_tiny, tmp_path):
    from diffusers import WanPipeline

    from vdit_sparse import shapes_world
    from vdit_sparse.pipelines.patch_vae import PatchPCAAutoencoder
    from vdit_sparse.pipelines.tiny import build_tokenizer

    ckpt, once = tmp_path / "ckpt", tmp_path / "once"
    fitted = run(train_tiny, "--stage", "vae", "--ckpt-dir", ckpt)
    assert 0.5 < fitted["variance_kept"] <= 1 and fitted["latents_std"] > 0
    with pytest.raises(SystemExit, match="holds a fitted vae already"):
        run(train_tiny, "--stage", "vae", "--ckpt-dir", ckpt)
    run(train_tiny, "--stage", "vae", "--ckpt-dir", once)
    assert run(train_tiny, "--stage", "dit", "--steps", 2, "--ckpt-dir", ckpt)["step"] == 2
    assert run(train_tiny, "--stage", "dit", "--steps", 2, "--ckpt-dir", ckpt)["step"] == 4
    run(train_tiny, "--stage", "dit", "--steps", 4, "--ckpt-dir", once)
    resumed, straight = train_tiny.load_checkpoint(ckpt, "dit"), train_tiny.load_checkpoint(once, "dit")
    for name, tensor in straight["model"].items():  # 2 + 2 resumed steps == 4 steps in one call
        assert torch.equal(resumed["model"][name], tensor), name
    assert sorted(p.name for p in ckpt.iterdir()) == ["dit-0000004.part0", "dit.json", "vae-0000000.part0", "vae.json"]

    out = tmp_path / "tiny"
    result = run(train_tiny, "--stage", "export", "--ckpt-dir", ckpt, "--out", out)
    assert result["size_mb"] < 40 and json.loads((out / "training.json").read_text())["dit_steps"] == 4
    pipe = WanPipeline.from_pretrained(out)
    assert isinstance(pipe.vae, PatchPCAAutoencoder)
    vae = train_tiny.load_vae(ckpt)
    assert torch.equal(pipe.vae.components, vae.components) and pipe.vae.config.latents_std == vae.config.latents_std
    for name, p in pipe.transformer.named_parameters():  # the export ships the EMA weights
        assert torch.equal(p.detach(), resumed["ema"][name]), name
    caption = "two red circles moving left on a plain background"
    assert pipe.tokenizer(caption).input_ids == build_tokenizer()(caption).input_ids
    frames = pipe(caption, num_frames=5, height=64, width=64, num_inference_steps=1, max_sequence_length=16,
                  output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 5, 64, 64, 3) and frames.min() >= 0 and frames.max() <= 1

    report = run(train_tiny, "--stage", "eval", "--ckpt-dir", ckpt, "--out", out, "--eval-clips", 1, "--eval-steps", 4,
                 "--eval-splits", "heldout", "train", "--svg-clips", 1)
    assert report["heldout"]["n"] == report["train"]["n"] == 1
    saved = json.loads((out / "eval.json").read_text())
    assert saved["heldout"].keys() >= {"colour_accuracy", "motion_accuracy", "count_accuracy", "mean_flicker", "clips"}
    clip = saved["heldout"]["clips"][0]
    assert clip["prompt"] in shapes_world.heldout_prompts()
    assert clip["colour_ok"] in (True, False) and isinstance(clip["flicker"], float)  # JSON values, not text
    shares = saved["svg_head_shares"]  # svg ran on 3 of 4 steps (a quarter warm-up), each head one class
    assert list(shares) == ["0"] and shares["0"]["spatial"] + shares["0"]["temporal"] + shares["0"]["dense"] == pytest.approx(1)
    assert (out / "eval-heldout.png").stat().st_size > 0
    assert list(saved["attention_entropy"]) == ["0"] and 0 < saved["attention_entropy"]["0"] <= 1
    assert list(saved["svg2_density"]) == ["0"] and 0 < saved["svg2_density"]["0"] <= 1

    more = tmp_path / "more"  # a later run continues from the shipped weights, in its own checkpoint folder
    assert run(train_tiny, "--stage", "dit", "--steps", 1, "--ckpt-dir", more, "--init-from", out)["step"] == 1
    assert torch.equal(train_tiny.load_vae(more).components, vae.components)


def test_learning_rate_warms_up_holds_then_decays(train_tiny):
    import dataclasses

    recipe = dataclasses.replace(train_tiny.CPU, warmup_steps=10, total_steps=100, decay_fraction=0.5, final_lr_fraction=0.1)
    rates = [train_tiny.learning_rate(s, recipe, 1.0) for s in (0, 9, 30, 50, 75, 100, 500)]
    assert rates == pytest.approx([0.1, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1])


def test_a_steps_batch_depends_only_on_the_step(train_tiny, tmp_path):
    """The pool renders lazily: a resumed run (empty pool) draws exactly the clips of one long run."""
    run(train_tiny, "--stage", "vae", "--ckpt-dir", tmp_path)
    vae, recipe = train_tiny.load_vae(tmp_path), train_tiny.SMOKE
    warm = train_tiny.LatentPool(vae, recipe, 7, "cpu")
    for step in range(5):
        warm.batch(step, 2)
    fresh = train_tiny.LatentPool(vae, recipe, 7, "cpu")
    for step in (4, 3):  # the pool holds 6 clips: these steps cross into the second epoch
        (a, ca), (b, cb) = warm.batch(step, 2), fresh.batch(step, 2)
        assert torch.equal(a, b) and ca == cb
    assert sorted(warm.clips_of(0, 2) + warm.clips_of(1, 2) + warm.clips_of(2, 2)) == list(range(6))  # one epoch


def test_flow_matching_follows_the_scheduler_sign_convention(train_tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0 = torch.randn(2, 16, 2, 4, 4)
    x_t, sigma, v = train_tiny.flow_matching_batch(x0, 3.0, torch.Generator().manual_seed(0))
    eps = v + x0
    assert torch.allclose(x_t, (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * eps, atol=1e-6)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    s, s_next = scheduler.sigmas[1], scheduler.sigmas[2]
    x = (1 - s) * x0 + s * eps
    stepped = scheduler.step(eps - x0, scheduler.timesteps[1], x, return_dict=False)[0]  # the exact v moves
    assert torch.allclose(stepped, (1 - s_next) * x0 + s_next * eps, atol=1e-5)  # along the straight path


def test_frozen_text_encoder_keeps_every_caption_apart(train_tiny):
    recipe = train_tiny.SMOKE
    pipe = train_tiny.build_pipeline(recipe, 0, train_tiny.build_transformer(recipe), train_tiny.build_vae(recipe.vae))
    table = train_tiny.caption_table(pipe, torch.device("cpu"))
    assert len(table) == 361 and "" in table  # 360 captions and the empty prompt of guidance
    embeds = torch.stack(list(table.values())).flatten(1)  # (361, MAX_TEXT_TOKENS * TEXT_DIM)
    distance = torch.cdist(embeds, embeds) + torch.eye(len(embeds)) * 1e9
    assert distance.min() > 0.2 * embeds.norm(dim=1).mean()  # even one-word changes move the embedding


def test_checkpoints_split_into_parts_and_reject_corruption(train_tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train_tiny, "PART_BYTES", 1000)
    state = dict(step=3, w=torch.arange(1000.0))
    train_tiny.save_checkpoint(state, tmp_path, "x")
    parts = sorted(tmp_path.glob("x-0000003.part*"))
    assert len(parts) >= 4 and all(p.stat().st_size <= 1000 for p in parts)
    assert torch.equal(train_tiny.load_checkpoint(tmp_path, "x")["w"], state["w"])
    train_tiny.save_checkpoint(dict(step=4, w=torch.zeros(3)), tmp_path, "x")
    assert not list(tmp_path.glob("x-0000003.part*"))  # superseded parts are removed after the manifest
    assert train_tiny.load_checkpoint(tmp_path, "missing") is None
    part = next(tmp_path.glob("x-0000004.part*"))
    part.write_bytes(part.read_bytes()[:-1] + b"!")
    with pytest.raises(RuntimeError, match="sha256"):
        train_tiny.load_checkpoint(tmp_path, "x")


def test_bad_arguments_are_named(train_tiny, tmp_path):
    with pytest.raises(SystemExit, match="no vae.json"):
        run(train_tiny, "--stage", "dit", "--steps", 1, "--ckpt-dir", tmp_path)
    with pytest.raises(SystemExit):
        train_tiny.parse_args(["--stage", "vae", "--ckpt-dir", str(tmp_path), "--minutes", "0"])
    with pytest.raises(SystemExit, match="not a pipeline directory"):
        run(train_tiny, "--stage", "dit", "--steps", 1, "--ckpt-dir", tmp_path / "c", "--init-from", tmp_path)


def test_saving_leaves_the_live_optimizer_moments_alone(train_tiny):
    """A checkpoint stores Adam moments in bf16; the optimizer that goes on training must keep its fp32 ones."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    saved = train_tiny.optimizer_state(optimizer, torch.bfloat16)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in saved["state"].values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    optimizer.step()  # a cast-in-place moment would fail here (lerp of bf16 with fp32 gradients)
