"""The training loop on tiny data: losses, the attention masks, HF export, and resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from blip2_embed.encoder import Blip2Encoder
from blip2_train.checkpoints import latest_checkpoint
from blip2_train.config import TrainConfig
from blip2_train.data import tokenize, tokenize_lm
from blip2_train.model_setup import SHAPES
from blip2_train.objectives import itg_attention_mask
from blip2_train.optimisation import warmup_cosine
from blip2_train.scenes import generate_dataset
from blip2_train.scratch import build_opt_tokenizer
from blip2_train.stages import train

TINY = replace(SHAPES["tiny"], num_query_tokens=8)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    # One caption per image and the batch = the dataset: every step sees the same batch.
    generate_dataset(folder, 8, seed=11, image_size=32, captions_per_image=1)
    return folder


def _config(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        shape=TINY,
        batch_size=8,
        batch_size0=8,
        steps0=4,
        steps1=6,
        steps2=4,
        warmup=2,
        lr0=2e-3,
        lr1=2e-3,
        lr2=2e-3,
        num_threads=1,
        log_every=100,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_itg_mask_queries_never_see_text() -> None:
    text_mask = torch.tensor([[1, 1, 1, 0]])
    allowed = itg_attention_mask(2, text_mask)[0, 0] == 0
    expected = torch.tensor(
        [  # q0 q1 t0 t1 t2 t3(pad)
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def test_caption_targets_start_with_bos_whatever_the_tokenizer(tmp_path: Path) -> None:
    opt = build_opt_tokenizer()
    texts = ["a red circle", "a tiny blue star in the top left corner"]
    # OPT's tokenizer adds BOS: the targets are what it gives for "text</s>" (as before the helper).
    old = tokenize(opt, [t + opt.eos_token for t in texts], 64)
    got = tokenize_lm(opt, texts, 64, opt.bos_token_id)
    assert torch.equal(got["input_ids"], old["input_ids"])
    assert torch.equal(got["attention_mask"], old["attention_mask"])
    opt.save_pretrained(tmp_path)
    no_bos = AutoTokenizer.from_pretrained(tmp_path, add_bos_token=False)
    assert no_bos(texts[0])["input_ids"][0] != opt.bos_token_id  # the premise
    assert torch.equal(tokenize_lm(no_bos, texts, 64, opt.bos_token_id)["input_ids"], old["input_ids"])


def test_schedule_warms_up_then_decays() -> None:
    f = warmup_cosine(10, 100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) < f(10) and f(100) == pytest.approx(0.1)


def test_losses_fall_and_export_loads_in_the_encoder(tiny_data: Path, tmp_path: Path) -> None:
    results = train(_config(tiny_data, tmp_path, steps0=12, steps1=12, steps2=12))
    s0, s1, s2 = results["stage0"], results["stage1"], results["stage2"]
    for row in s0 + s1 + s2:
        assert all(np.isfinite(v) for v in row.values())
    assert s0[-1]["loss"] < s0[0]["loss"]
    assert s1[-1]["loss"] < s1[0]["loss"]
    assert s1[-1]["itg"] < s1[0]["itg"]
    assert s2[-1]["lm"] < s2[0]["lm"]
    encoder = Blip2Encoder.from_pretrained(
        retrieval=str(tmp_path / "retrieval"), caption=str(tmp_path / "caption"), device="cpu"
    )
    # Stage 2 froze the ViT blocks it copied from stage 1, so the pair shares them.
    assert encoder.shared_vit
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert encoder.embed_images(images).shape == (2, 8, TINY.embed_dim)
    assert encoder.embed_texts(["a red circle"]).shape == (1, TINY.embed_dim)
    assert encoder.itm(images, "a red circle").probs.shape == (2,)
    assert len(encoder.caption(images, max_new_tokens=3)) == 2
    # Training-only parameters (temperature, ITG head) are not in the HF checkpoint.
    keys = load_file(tmp_path / "retrieval" / "model.safetensors").keys()
    assert not any("itg" in k or "temperature" in k for k in keys)


def test_resume_continues_exactly(tiny_data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(_config(tiny_data, straight, stage="1"))
    split = tmp_path / "split"
    partial = train(_config(tiny_data, split, stage="1", max_steps_this_run=3))
    assert len(partial["stage1"]) == 3 and not (split / "retrieval").exists()
    ckpt = latest_checkpoint(split / "checkpoints")
    assert ckpt is not None and ckpt.name == "stage1-step000003"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["optimizer"]["state"]  # Adam moments were saved
    resumed = train(_config(tiny_data, split, stage="1", resume=True))
    assert [r["step"] for r in resumed["stage1"]] == [4, 5, 6]
    a = load_file(straight / "retrieval" / "model.safetensors")
    b = load_file(split / "retrieval" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_cli_scenes_train_and_eval(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from blip2_search.cli import app

    runner = CliRunner()
    data, out = tmp_path / "data", tmp_path / "model"
    result = runner.invoke(app, ["scenes", str(data), "--n", "8", "--seed", "3", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    args = [
        "train",
        str(data),
        "--out",
        str(out),
        "--shape",
        "tiny",
        "--shape-json",
        '{"num_query_tokens": 8}',
        "--steps0",
        "2",
        "--steps1",
        "2",
        "--steps2",
        "2",
        "--batch-size",
        "4",
        "--batch-size0",
        "4",
        "--threads",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "retrieval" / "model.safetensors").is_file() and (out / "caption" / "config.json").is_file()
    result = runner.invoke(
        app,
        [
            "eval",
            "retrieval",
            str(data / "karpathy.json"),
            "--retrieval-model",
            str(out / "retrieval"),
            "--k",
            "4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["images"] == 8 and report["texts"] == 40
    assert 0.0 <= report["itm_t2i"]["r1"] <= report["itm_t2i"]["r10"] <= 1.0


def test_scenes_and_eval_retrieval_show_progress_and_read_the_settings(
    tmp_path: Path, tiny_checkpoints
) -> None:
    import json
    import os
    import subprocess
    import sys

    # Piped output (not a terminal): plain progress lines on stderr, the report alone on stdout.
    env = {**os.environ, "BLIP2_RETRIEVAL_MODEL": str(tiny_checkpoints.retrieval), "BLIP2_DEVICE": "cpu"}
    env.pop("BLIP2_BATCH_SIZE", None)
    cli = [sys.executable, "-m", "blip2_search.cli"]
    data = tmp_path / "scenes"
    made = subprocess.run(
        [*cli, "scenes", str(data), "--n", "6", "--image-size", "32"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    assert "scenes: 6/6 (100%)" in made.stderr
    result = subprocess.run(
        [*cli, "eval", "retrieval", str(data), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 6 and report["texts"] == 30
    assert report["k"] == 16  # the CPU default depth
    # 30 texts x 6 candidate images, then 6 images x 16 candidate texts.
    for phase in ("images: 6/6", "texts: 30/30", "text -> image: 180/180", "image -> text: 96/96"):
        assert phase in result.stderr, result.stderr


def test_queries_from_caption_gives_the_caption_query_outputs(tiny_checkpoints) -> None:
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    from blip2_embed.encoder import query_output
    from blip2_train.model_setup import queries_from_caption
    from blip2_train.objectives import vision_embeds

    retrieval = Blip2ForImageTextRetrieval.from_pretrained(tiny_checkpoints.retrieval).eval()
    caption = Blip2ForConditionalGeneration.from_pretrained(tiny_checkpoints.caption).eval()
    text_ffn = retrieval.qformer.encoder.layer[0].output.dense.weight.clone()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = query_output(retrieval, vision_embeds(retrieval, pixels))
        queries_from_caption(retrieval, caption)
        after = query_output(retrieval, vision_embeds(retrieval, pixels))
        expected = query_output(caption, vision_embeds(caption, pixels))
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected)
    assert torch.equal(retrieval.qformer.encoder.layer[0].output.dense.weight, text_ffn)  # text branch kept


def test_train_puts_the_process_torch_state_back(tiny_data: Path, tmp_path: Path) -> None:
    """Flushing subnormals (set for training speed) must not leak into the rest of the process (a
    flushed FPU makes hypothesis, and so the API fuzz tests after these, refuse to run)."""
    threads = torch.get_num_threads()
    train(_config(tiny_data, tmp_path, stage="1", steps1=1, num_threads=1))
    assert torch.get_num_threads() == threads
    assert np.float64(5e-324) * np.float64(1.0) != 0.0  # subnormals are still representable


def test_stage1_learns_from_hard_negative_texts(tmp_path: Path) -> None:
    data = tmp_path / "scenes"
    generate_dataset(data, 8, seed=11, image_size=32, captions_per_image=1, negatives=True)
    results = train(_config(data, tmp_path / "out", stage="0,1", steps1=12, text_negatives=True))
    s1 = results["stage1"]
    assert all(np.isfinite(v) for row in s1 for v in row.values())
    assert s1[-1]["loss"] < s1[0]["loss"]
    assert Blip2Encoder.from_pretrained(
        retrieval=str(tmp_path / "out" / "retrieval"), caption=None, device="cpu"
    ).embed_texts(["a red circle"]).shape == (1, TINY.embed_dim)


def test_itm_weight_scales_the_itm_term_of_the_stage1_loss(tiny_data: Path, tmp_path: Path) -> None:
    """The first step of two otherwise identical runs sees the same batch and weights, so only the
    ITM term's weight differs in the total."""
    runs = {}
    for w in (1.0, 3.0):
        cfg = _config(tiny_data, tmp_path / f"w{w}", stage="1", steps1=1, itm_weight=w)
        runs[w] = train(cfg)["stage1"][0]
    one, three = runs[1.0], runs[3.0]
    assert one["itc"] == three["itc"] and one["itm"] == three["itm"]
    assert three["loss"] == pytest.approx(one["loss"] + 2 * one["itm"], rel=1e-5)


def test_hard_negatives_change_the_stage1_losses(tiny_checkpoints) -> None:
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    from blip2_train.objectives import Stage1, TextNegatives

    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_checkpoints.retrieval)
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints.retrieval)
    stage = Stage1(model, dec_token_id=tok.cls_token_id, train_vision=False)
    pixels = torch.randn(3, 3, 32, 32)
    both = tokenize(tok, ["a red circle", "a blue square", "a green star"] + ["a red square"] * 3, 16)
    texts = {k: v[:3] for k, v in both.items()}

    def losses(matches: torch.Tensor | None) -> tuple[float, float]:
        negatives = None
        if matches is not None:
            negatives = TextNegatives(both["input_ids"][3:], both["attention_mask"][3:], matches)
        gen = torch.Generator().manual_seed(0)
        out = stage(pixels, texts["input_ids"], texts["attention_mask"], generator=gen, negatives=negatives)
        return out.itc.item(), out.itm.item()

    plain = losses(None)
    unmatched = losses(torch.zeros(3, 3, dtype=torch.bool))
    matched = losses(torch.eye(3, dtype=torch.bool))
    # The negatives join ITC's image -> text softmax and ITM's pairs; a negative that in fact describes
    # its image is a positive in both.
    assert unmatched[0] != plain[0] and unmatched[1] != plain[1]
    assert matched[0] != unmatched[0] and matched[1] != unmatched[1]


def test_text_negatives_without_negatives_in_the_data_say_how_to_make_them(
    tiny_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="scenes --negatives"):
        train(_config(tiny_data, tmp_path, stage="1", text_negatives=True))


def test_a_vit_trained_in_stage1_is_shared_again_after_stage2_on_it(tiny_data: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    train(_config(tiny_data, base))
    tuned = tmp_path / "tuned"
    train(
        _config(
            tiny_data, tuned, stage="1", init_retrieval=str(base / "retrieval"), train_vision=True, steps1=3
        )
    )

    def pair(retrieval: Path, caption: Path) -> Blip2Encoder:
        return Blip2Encoder.from_pretrained(retrieval=str(retrieval), caption=str(caption), device="cpu")

    assert pair(base / "retrieval", base / "caption").shared_vit
    assert not pair(tuned / "retrieval", base / "caption").shared_vit  # the blocks trained
    train(
        _config(
            tiny_data,
            tuned,
            stage="2",
            init_caption=str(base / "caption"),
            vision_from=str(tuned / "retrieval"),
            steps2=2,
        )
    )
    assert pair(tuned / "retrieval", tuned / "caption").shared_vit


def test_position_init_std_sets_the_new_vits_position_embeddings(tiny_data: Path, tmp_path: Path) -> None:
    from transformers import Blip2ForImageTextRetrieval

    def position_std(out: Path) -> float:
        model = Blip2ForImageTextRetrieval.from_pretrained(
            str(latest_checkpoint(out / "ck", stage=0) / "model")
        )
        return float(model.vision_model.embeddings.position_embedding.std())

    for std, out in ((None, tmp_path / "default"), (1.0, tmp_path / "wide")):
        train(
            _config(
                tiny_data, out, stage="0", steps0=1, checkpoint_dir=str(out / "ck"), position_init_std=std
            )
        )
    assert position_std(tmp_path / "default") < 0.1  # transformers' 0.02, after one step
    assert 0.8 < position_std(tmp_path / "wide") < 1.2


@pytest.mark.parametrize(
    ("flag", "needs"), [(["--text-negatives"], "negatives"), (["--near-ratio", "0.5"], "near")]
)
def test_cli_hard_negative_flags_on_data_without_them_fail_in_one_line(
    tiny_data: Path, tmp_path: Path, flag: list[str], needs: str
) -> None:
    from typer.testing import CliRunner

    from blip2_search.cli import app

    args = ["train", str(tiny_data), "--out", str(tmp_path), "--shape", "tiny", "--stage", "1", *flag]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f'"{needs}"' in lines[0] and "scenes --negatives" in lines[0], result.output
    assert "Traceback" not in result.output
