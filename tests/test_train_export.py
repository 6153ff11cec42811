"""Checkpoint → GGUF export: tensors, types and keys against the spec, and the file's logits against the
trainer's own forward (through the float64 reference forward pass and through ternary.Engine)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from reference_forward import load_gguf, reference_forward
from ternary.formats import quants
from ternary.formats.reader import GGUFFile
from ternary.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ternary.training.cli import main as cli_main
from ternary.training.config import TrainConfig
from ternary.training.export import ExportError, export_checkpoint
from ternary.training.model import init_params
from ternary.training.trainer import Trainer, byte_tokenizer_metadata

TEXT = b"".join(
    b"def f%d(x):\n    return x * %d + len('abc')\n\n" % (i, i * 7 % 13) for i in range(60)
)  # fmt: skip
MODEL = dict(n_embd=256, n_layer=1, n_head=4, n_head_kv=2, n_ff=256, n_ctx_train=64, ffn_act="relu2")
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few training steps of an exportable tiny model; (trainer, checkpoint path)."""
    d = tmp_path_factory.mktemp("export")
    (d / "text.py").write_bytes(TEXT)
    cfg = TrainConfig.from_dict({
        "model": MODEL,
        "schedule": {"steps": 6, "warmup_steps": 1},
        "data": {"path": str(d / "text.py"), "seq_len": 32, "batch_size": 4},
        "run": {"out_dir": str(d / "run"), "log_every": 100, "ckpt_every": 100},
    })  # fmt: skip
    trainer = Trainer(cfg, log=lambda msg: None)
    trainer.fit()
    return trainer, list_checkpoints(d / "run")[-1][1]


def fp16(x: float) -> float:
    return float(np.float16(x))


@pytest.mark.parametrize("linear_type, embed_type", [("TQ2_0", "F16"), ("TQ1_0", "Q8_0"), ("TQ2_0", "Q6_K")])
def test_exported_file_follows_the_spec(trained, tmp_path, linear_type, embed_type):
    trainer, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "m.gguf", linear_type, embed_type)
    arrays, _ = load_checkpoint(ckpt)
    f = GGUFFile(out)
    md = f.metadata
    assert f.architecture == "bitnet"
    assert md["bitnet.hidden_act"] == "relu2"
    assert md["bitnet.embedding_length"] == 256 and md["bitnet.block_count"] == 1
    assert md["bitnet.attention.head_count"] == 4 and md["bitnet.attention.head_count_kv"] == 2
    assert md["bitnet.feed_forward_length"] == 256 and md["bitnet.context_length"] == 64
    assert md["tokenizer.ggml.model"] == "gpt2" and len(md["tokenizer.ggml.tokens"]) == 258
    assert md["tokenizer.ggml.eos_token_id"] == 257
    assert "output.weight" not in f.tensors  # tied head
    assert not any(name.endswith(".scale") for name in f.tensors)  # the scale is folded into the blocks
    lt = {"TQ2_0": quants.TQ2_0, "TQ1_0": quants.TQ1_0}[linear_type]
    et = {"F16": quants.F16, "Q8_0": quants.Q8_0, "Q6_K": quants.Q6_K}[embed_type]
    assert f.tensors["token_embd.weight"].ggml_type == et
    for lin in LINEARS:
        name = f"blk.0.{lin}.weight"
        w = arrays[f"model/{name}"]
        gamma = float(np.mean(np.abs(w), dtype=np.float64)) + 1e-5
        want_codes = np.clip(np.round(w / np.float32(gamma)), -1, 1)
        assert f.tensors[name].ggml_type == lt and f.tensors[name].shape == w.shape
        codes, scales, block = f.ternary_codes(name)
        assert block == 256
        np.testing.assert_array_equal(codes, want_codes)
        assert np.all(scales == np.float32(fp16(gamma)))  # every block's d is the tensor's γ
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_sub_norm.weight", "output_norm.weight"):
        assert f.tensors[name].ggml_type == quants.F32
        np.testing.assert_array_equal(f.dequantize(name), arrays[f"model/{name}"])
    embd = arrays["model/token_embd.weight"]
    np.testing.assert_allclose(f.dequantize("token_embd.weight"), embd, atol=np.abs(embd).max() / 50)
    f.close()


@pytest.mark.parametrize(
    "linear_type, embed_type, mean_tol", [("TQ2_0", "F16", 2e-3), ("TQ1_0", "Q8_0", 1e-2)]
)
def test_exported_logits_match_the_trainer(trained, tmp_path, linear_type, embed_type, mean_tol):
    trainer, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "m.gguf", linear_type, embed_type)
    cfg, tensors, head_act = load_gguf(str(out))
    ids = np.frombuffer(TEXT[:48], dtype=np.uint8).astype(np.int64)
    ours = trainer.model.logits(trainer.params, ids[None])[0]
    theirs = reference_forward(cfg, tensors, ids, act_quant="per_token", head_act=head_act)
    diff = np.abs(ours - theirs)
    # only fp16 rounding of γ / the embedding and the head's activation format separate the two
    assert diff.mean() < mean_tol * ours.std() and diff.max() < 0.05 * ours.std()
    assert np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= 0.9


def test_engine_logits_match_the_trainer(trained, tmp_path):
    from ternary import Engine

    trainer, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "m.gguf", "TQ2_0", "F16")
    ids = [int(b) for b in TEXT[:48]]
    engine = Engine(str(out), act_quant="per_token")
    theirs = np.asarray(engine.logits(ids), dtype=np.float64).reshape(len(ids), -1)
    ours = trainer.model.logits(trainer.params, np.array([ids]))[0]
    diff = np.abs(ours - theirs)
    print(f"engine vs trainer: max {diff.max():.4f} mean {diff.mean():.5f} (logit std {ours.std():.3f})")
    assert diff.mean() < 0.01 * ours.std() and diff.max() < 0.1 * ours.std()
    assert np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= 0.9


def handmade_checkpoint(path, tokenizer=True, **model):
    cfg = TrainConfig.from_dict({"model": {**MODEL, "n_vocab": 258, **model}})
    params = init_params(cfg.model, np.random.default_rng(0))
    state = {"config": cfg.to_dict(), "tokenizer": byte_tokenizer_metadata() if tokenizer else None}
    save_checkpoint(path, {f"model/{k}": v for k, v in params.items()}, state)
    return path


@pytest.mark.parametrize(
    "model, message",
    [
        (dict(qk_norm=True), "model.qk_norm"),
        (dict(attn_softcap=30.0), "model.attn_softcap"),
        (dict(logit_softcap=15.0), "model.logit_softcap"),
        (dict(ternary=False), "model.ternary is false"),
        (dict(n_ff=384), "n_ff = 384 is not a multiple of 256"),
    ],
)
def test_export_refuses_what_llama_cpp_cannot_run(tmp_path, model, message):
    ckpt = handmade_checkpoint(tmp_path / "c.tck", **model)
    with pytest.raises(ExportError, match=message):
        export_checkpoint(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_export_needs_tokenizer_metadata(tmp_path):
    ckpt = handmade_checkpoint(tmp_path / "c.tck", tokenizer=False)
    with pytest.raises(ExportError, match="no tokenizer metadata"):
        export_checkpoint(ckpt, tmp_path / "m.gguf")


def test_cli_export(tmp_path):
    ckpt = handmade_checkpoint(tmp_path / "c.tck")
    result = CliRunner().invoke(
        cli_main, ["export", str(ckpt), str(tmp_path / "m.gguf"), "--embed-type", "Q8_0"]
    )
    assert result.exit_code == 0, result.output
    assert GGUFFile(tmp_path / "m.gguf").tensors["token_embd.weight"].ggml_type == quants.Q8_0
    bad = tmp_path / "bad.tck"
    bad.write_bytes(ckpt.read_bytes()[:-1])
    result = CliRunner().invoke(cli_main, ["export", str(bad), str(tmp_path / "n.gguf")])
    assert result.exit_code == 1 and "checksum mismatch" in result.output


def test_bpe_corpus_to_gguf_pipeline(tmp_path):
    """Learned BPE → corpus shards → training → GGUF: the vocabulary comes from the corpus and its tokenizer
    travels inside the checkpoint into the file."""
    from ternary.formats.tokenizer import Tokenizer
    from ternary.training.bpe_trainer import learn_bpe
    from ternary.training.corpus import build_corpus

    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"m{i}.py").write_bytes(TEXT[i * 300 : i * 300 + 900])
    md = learn_bpe([TEXT.decode()], vocab_size=300, min_frequency=2)
    build_corpus([src], tmp_path / "corpus", md, heldout_fraction=0.0, progress=False)
    cfg = TrainConfig.from_dict({
        "model": MODEL,
        "schedule": {"steps": 2, "warmup_steps": 1},
        "data": {"path": str(tmp_path / "corpus"), "seq_len": 16, "batch_size": 2},
        "run": {"out_dir": str(tmp_path / "run"), "log_every": 100},
    })  # fmt: skip
    trainer = Trainer(cfg, log=lambda msg: None)
    n_vocab = len(md["tokenizer.ggml.tokens"])
    assert trainer.cfg.model.n_vocab == n_vocab
    trainer.fit()
    out = export_checkpoint(list_checkpoints(tmp_path / "run")[-1][1], tmp_path / "m.gguf")
    f = GGUFFile(out)
    assert f.tensors["token_embd.weight"].shape == (n_vocab, 256)
    assert f.metadata["tokenizer.ggml.merges"] == md["tokenizer.ggml.merges"]
    tok = Tokenizer.from_metadata(f.metadata)
    assert tok.decode(tok.encode("def f1(x):\n    return x")) == "def f1(x):\n    return x"


def test_byte_level_tokenizer_in_the_file_gives_raw_bytes(trained, tmp_path):
    """The byte vocabulary's one merge ("a" + newline) can never apply: text encodes to its UTF-8 bytes."""
    from ternary.formats.tokenizer import Tokenizer

    _, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "m.gguf")
    tok = Tokenizer.from_metadata(GGUFFile(out).metadata)
    text = "data\nfor a in b:\n\tpass  # ünïcode ✓ a\n\na\r\n"
    assert tok.encode(text, add_bos=False) == list(text.encode())
    assert tok.decode(list(text.encode())) == text
