"""Own image-text pairs end to end: prepare (bad rows, --strict, resume, atomic output, the
digest check), then train on them (random, streamed and hard batches) with a held-out split
and image->text / text->image recall@1/5/10."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contrastive.configs import parse_config
from contrastive.data import own_pairs
from contrastive.run import loop
from experiments import prepare_pairs, train

REPO = Path(__file__).resolve().parents[1]
COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
    "purple": (150, 40, 180), "orange": (240, 140, 20), "white": (240, 240, 240),
    "black": (15, 15, 15),
}  # fmt: skip
N_GOOD = 240
BAD = {"missing file": 3, "unreadable image": 2, "empty caption": 2, "duplicate row": 2}


def _write_pairs(root: Path, fmt: str = "csv") -> tuple[Path, Path]:
    """N_GOOD colour images (PNG and JPEG, 20-28 px, not square) with captions naming the
    colour, and the bad rows of BAD; returns (captions file, images dir)."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    names = list(COLOURS)
    for i in range(N_GOOD):
        colour = names[i % len(names)]
        h, w = 20 + i % 5, 24 + i % 4
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(
            np.uint8
        )
        rel = f"sub/img{i:04d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(images / rel)
        rows.append({"image": rel, "caption": f"a {colour} picture, number {i}"})
    for k in range(BAD["missing file"]):
        rows.append({"image": f"sub/gone{k}.png", "caption": f"a lost picture {k}"})
    for k in range(BAD["unreadable image"]):
        (images / f"broken{k}.png").write_bytes(b"\x89PNG not really" * 3)
        rows.append({"image": f"broken{k}.png", "caption": f"a broken picture {k}"})
    for k in range(BAD["empty caption"]):
        rows.append({"image": rows[k]["image"], "caption": "  "})
    for k in range(BAD["duplicate row"]):
        rows.append(dict(rows[10 + k]))
    captions = root / f"pairs.{fmt}"
    if fmt == "jsonl":
        captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(captions, "w", newline="") as f:
            w = csv.DictWriter(f, ["image", "caption"], delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    return captions, images


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The command, in a subprocess with two worker processes: (out dir, its stdout)."""
    root = tmp_path_factory.mktemp("own")
    captions, images = _write_pairs(root)
    out = root / "prepared"
    run = subprocess.run(
        [sys.executable, "-m", "experiments.prepare_pairs", "--captions", str(captions),
         "--images", str(images), "--out", str(out), "--image-size", "16", "--shard-size",
         "64", "--workers", "2", "--no-progress"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return out, run.stdout


def test_prepare_writes_shards_spec_and_every_bad_row(prepared):
    out, stdout = prepared
    spec = json.loads((out / own_pairs.SPEC_FILE).read_text())
    assert spec["count"] == N_GOOD and spec["rows_read"] == N_GOOD + sum(BAD.values())
    assert spec["bad_rows"] == BAD
    assert spec["image_size"] == 16 and spec["caption_column"] == "caption"
    assert len(spec["shards"]) == 4 and sum(s["count"] for s in spec["shards"]) == N_GOOD
    line = "kept 240 of 249 rows; bad: 3 missing file, 2 unreadable image, 2 empty caption, "
    assert line + "2 duplicate row" in stdout
    with open(out / own_pairs.BAD_ROWS_FILE) as f:
        bad = list(csv.DictReader(f, delimiter="\t"))
    assert sorted(b["problem"] for b in bad) == sorted(k for k, n in BAD.items() for _ in range(n))
    assert {b["image"] for b in bad if b["problem"] == "unreadable image"} == {
        "broken0.png", "broken1.png"}  # fmt: skip
    assert not out.with_name(out.name + ".partial").exists()
    # The pairs read back in file order: decoded once, centre-cropped, resized.
    src = own_pairs.open_pairs(out)
    assert len(src) == N_GOOD
    first, last = src[0], src[N_GOOD - 1]
    assert first["image"].shape == (16, 16, 3) and first["image"].dtype == np.uint8
    assert str(first["captions"]["text"][0]) == "a red picture, number 0"
    assert str(last["captions"]["text"][0]) == f"a black picture, number {N_GOOD - 1}"
    red = first["image"].reshape(-1, 3).mean(0)
    assert red[0] > 150 and red[1] < 90 and red[2] < 90  # the red image, not another


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_tsv_and_json_lines_read_alike(tmp_path, fmt):
    captions, images = _write_pairs(tmp_path, fmt)
    spec = own_pairs.prepare(
        str(captions), str(images), str(tmp_path / "out"), image_size=8, workers=1,
        progress=False,
    )  # fmt: skip
    assert spec["count"] == N_GOOD and spec["bad_rows"] == BAD


def test_strict_refuses_bad_rows_before_decoding(tmp_path, capsys):
    captions, images = _write_pairs(tmp_path)
    out = tmp_path / "out"
    argv = ["--captions", str(captions), "--images", str(images), "--out", str(out), "--strict",
            "--no-progress"]  # fmt: skip
    assert prepare_pairs.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --strict: 7 of 249 rows are bad")
    assert "(3 missing file, 2 empty caption, 2 duplicate row; first: row 241" in err
    assert "drop --strict" in err
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_strict_refuses_unreadable_images(tmp_path, capsys):
    captions, images = _write_pairs(tmp_path)
    with open(captions) as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if r["caption"].strip() and not r["image"].startswith("sub/gone")]
    keep = list({(r["image"], r["caption"]): r for r in keep}.values())  # no duplicates
    with open(captions, "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption"])
        w.writeheader()
        w.writerows(keep)
    out = tmp_path / "out"
    argv = ["--captions", str(captions), "--images", str(images), "--out", str(out), "--strict",
            "--workers", "1", "--no-progress"]  # fmt: skip
    assert prepare_pairs.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "2 of 242 rows are bad (2 unreadable image; first: row 241" in err, err
    assert "broken0.png" in err
    assert not out.exists()  # nothing that looks like a data set


def test_bad_input_is_one_line(tmp_path, capsys):
    captions, images = _write_pairs(tmp_path)
    base = ["--images", str(images), "--no-progress"]
    cases = [
        (["--captions", str(captions), "--out", str(tmp_path / "o"), "--caption-column",
          "text"], "has no column 'text' (--caption-column); it has caption, image: name"),
        (["--captions", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")],
         "does not exist: pass a file"),
        (["--captions", str(captions), "--out", str(images)], "exists and is not empty"),
    ]  # fmt: skip
    for argv, message in cases:
        try:
            status = prepare_pairs.main([*base, *argv])
        except SystemExit as e:  # the parser's own errors (a flag's type) exit at once
            status = e.code
        assert status == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


class Killed(Exception):
    """Stands in for a kill in the middle of a shard."""


def test_a_stopped_preparation_resumes_and_is_never_half_visible(tmp_path, monkeypatch):
    captions, images = _write_pairs(tmp_path)
    out = tmp_path / "out"
    kw = dict(image_size=16, shard_size=64, workers=1, progress=False)
    real, calls, die = own_pairs._write_shard, [], {"at": 3}

    def dies_at_a_call(task):
        calls.append(task.shard)
        if len(calls) == die["at"]:
            raise Killed
        return real(task)

    monkeypatch.setattr(own_pairs, "_write_shard", dies_at_a_call)
    with pytest.raises(Killed):
        own_pairs.prepare(str(captions), str(images), str(out), **kw)
    assert not out.exists()  # only the .partial folder, which no reader accepts
    assert not own_pairs.is_prepared(out.with_name("out.partial"))
    calls.clear()
    die["at"] = None
    spec = own_pairs.prepare(str(captions), str(images), str(out), **kw)
    assert calls == [2, 3]  # shards 0 and 1 were kept from the stopped run
    assert own_pairs.is_prepared(out) and not out.with_name("out.partial").exists()
    fresh = own_pairs.prepare(str(captions), str(images), str(tmp_path / "fresh"), **kw)
    assert spec["data_sha256"] == fresh["data_sha256"]
    assert spec["inputs_sha256"] == fresh["inputs_sha256"]
    # An unfinished preparation with other flags is refused, never mixed in.
    calls.clear()
    die["at"] = 1
    with pytest.raises(Killed):
        own_pairs.prepare(str(captions), str(images), str(tmp_path / "third"), **kw)
    with pytest.raises(ValueError, match="unfinished preparation with other inputs or flags"):
        own_pairs.prepare(str(captions), str(images), str(tmp_path / "third"),
                          **{**kw, "image_size": 8})  # fmt: skip


def test_a_changed_shard_is_refused_when_read(tmp_path):
    captions, images = _write_pairs(tmp_path)
    out = tmp_path / "out"
    spec = own_pairs.prepare(str(captions), str(images), str(out), image_size=8, shard_size=100,
                             workers=1, progress=False)  # fmt: skip
    shard = out / spec["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00001.array_record does not match its sha256"):
        own_pairs.open_pairs(out)


FAST = ["--model", "mlp", "--width", "32", "--embed-dim", "16", "--text-len", "8",
        "--vocab-size", "128", "--batch-size", "32", "--steps", "4", "--warmup-steps", "1",
        "--checkpoint-every", "4", "--log-every", "2", "--eval-examples", "40",
        "--no-progress"]  # fmt: skip
RECALL = [f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [[], ["--chunk-size", "16", "--stream"],
     # 200 training pairs, 6 batches an epoch: the first hard batch is step 7.
     ["--hard-batches", "--cluster-size", "8", "--refresh-every", "2", "--steps", "8",
      "--checkpoint-every", "8"]],
    ids=["random", "streamed", "hard"],
)  # fmt: skip
def test_training_on_own_pairs_reports_recall(prepared, tmp_path, mode):
    out, _ = prepared
    cfg = parse_config(["--workdir", str(tmp_path / "w"), "--dataset", str(out), *FAST, *mode])
    records = loop.train(cfg)
    final = records[-1]
    assert final["step"] == cfg.steps and np.isfinite(final["loss"])
    for d in ("i2t", "t2i"):
        r1, r5, r10 = (final[f"{d}_r@{k}"] for k in (1, 5, 10))
        assert 0 <= r1 <= r5 <= r10 <= 1 and r10 > 0  # 40 held-out pairs: some are found


def test_train_command_errors_on_own_pairs_are_one_line(prepared, tmp_path, capsys):
    out, _ = prepared
    argv = ["--workdir", str(tmp_path / "w"), "--dataset", str(out), *FAST]
    assert train.main([*argv, "--eval-examples", str(N_GOOD)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--eval-examples 240 must leave training pairs" in err
    assert train.main([*argv[:3], str(tmp_path), *argv[4:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "--dataset" in err and "prepare_pairs" in err, err
