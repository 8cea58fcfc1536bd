"""data_prep: image folders and Fashion-MNIST -> shards + manifest; bad inputs; crash and resume."""
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from webdataset.tariterators import tarfile_samples

from ssl_foundry.data_prep.fashion_mnist import CLASSES, prep_fashion_mnist
from ssl_foundry.data_prep.images import prep_images
from ssl_foundry.data_prep.shard_format import ManifestError, PrepError, file_sha256, read_manifest, shard_paths
from ssl_foundry.data_prep.shards import group_into_shards
from ssl_foundry.launch.cli import main

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SIDE = 28
IMAGE_KEYS = ("jpg", "png", "webp")


def fashion_mnist_head(prefix: str, count: int) -> tuple[list[bytes], bytes]:
    """The first ``count`` images (raw 28x28 pixels) and labels of a split, read from the idx files."""
    with gzip.open(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz") as f:
        pixels = f.read(16 + count * SIDE * SIDE)[16:]
    with gzip.open(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = f.read(8 + count)[8:]
    return [pixels[i * SIDE * SIDE:(i + 1) * SIDE * SIDE] for i in range(count)], labels


def save_image(path: Path, pixels: bytes, image_format: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("L", (SIDE, SIDE), pixels).save(path, image_format)


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """ImageNet style: 3 class folders of Fashion-MNIST images in 4 formats, one nested deeper."""
    src = tmp_path / "src"
    images, _ = fashion_mnist_head("train", 13)
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
    for i, pixels in enumerate(images[:12]):
        extension, image_format = formats[i % 4]
        save_image(src / ["bag", "coat", "trouser"][i % 3] / f"img{i:02d}.{extension}", pixels, image_format)
    save_image(src / "coat" / "more" / "deep.png", images[12], "PNG")
    return src


def input_files(src: Path) -> list[str]:
    return sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() or p.is_symlink())


def read_back(out: Path) -> list[dict]:
    """Every sample of the shard folder, read the way the training loader reads them."""
    return list(tarfile_samples([{"url": path} for path in shard_paths(out)]))


def assert_shards_verify(out: Path) -> None:
    manifest = read_manifest(out)
    for record, path in zip(manifest["shards"], shard_paths(out), strict=True):
        assert record["complete"] and Path(path).name == record["name"]
        assert file_sha256(path) == record["sha256"] and os.path.getsize(path) == record["bytes"]
        assert record["index"] == Path(path).with_suffix(".idx").name and (out / record["index"]).is_file()
        assert record["indexed_samples"] == record["num_samples"]
    assert sum(s["num_samples"] for s in manifest["shards"]) == manifest["num_samples"]
    assert not list(out.glob("*.tmp"))


def test_class_folders_round_trip(class_folder, tmp_path):
    out = tmp_path / "shards"
    summary = prep_images(class_folder, out, shard_size=5, workers=2)
    manifest = read_manifest(out)
    assert manifest["labelled"] and manifest["classes"] == ["bag", "coat", "trouser"]
    assert manifest["num_samples"] == summary["samples"] == 13 and manifest["skipped"] == []
    assert [s["num_samples"] for s in manifest["shards"]] == [5, 5, 3]
    assert_shards_verify(out)

    samples = read_back(out)
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(13)]
    assert [json.loads(s["json"])["source"] for s in samples] == input_files(class_folder)
    for sample in samples:
        meta = json.loads(sample["json"])
        (image_key,) = [k for k in IMAGE_KEYS if k in sample]
        assert image_key == {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}[Path(meta["source"]).suffix]
        assert sample[image_key] == (class_folder / meta["source"]).read_bytes()
        class_name = meta["source"].split("/")[0]
        assert meta["label"] == class_name and int(sample["cls"]) == manifest["classes"].index(class_name)
        assert (meta["width"], meta["height"]) == (SIDE, SIDE)


def test_unlabelled_folder_is_walked_recursively_once(tmp_path):
    """A top-level image makes SRC unlabelled even beside subfolders; a folder linked twice counts once."""
    src = tmp_path / "src"
    images, _ = fashion_mnist_head("t10k", 3)
    save_image(src / "top.png", images[0], "PNG")
    save_image(src / "nested" / "deeper" / "a.jpg", images[1], "JPEG")
    save_image(src / "nested" / "b.png", images[2], "PNG")
    (src / "alias").symlink_to(src / "nested", target_is_directory=True)
    out = tmp_path / "shards"
    prep_images(src, out, workers=1)
    manifest = read_manifest(out)
    assert not manifest["labelled"] and manifest["classes"] == []
    assert manifest["num_samples"] == 3 and manifest["skipped"] == []
    samples = read_back(out)
    assert all("cls" not in s and "label" not in json.loads(s["json"]) for s in samples)
    assert sorted(json.loads(s["json"])["source"] for s in samples) == ["alias/b.png", "alias/deeper/a.jpg", "top.png"]


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    src = tmp_path / "src"
    images, _ = fashion_mnist_head("train", 2)
    save_image(src / "good.png", images[0], "PNG")
    save_image(src / "good_jpeg_named.png", images[1], "JPEG")  # keyed by its real format: jpg
    noise = Image.frombytes("L", (64, 64), random.Random(0).randbytes(64 * 64))
    jpeg = io.BytesIO()
    noise.save(jpeg, "JPEG")
    (src / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (src / "garbage.jpg").write_bytes(random.Random(1).randbytes(500))
    (src / "empty.png").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")
    noise.save(src / "animation.webp.gif", "GIF")
    noise.save(src / "gif_named.png", "GIF")
    (src / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")

    out = tmp_path / "shards"
    summary = prep_images(src, out, workers=1)
    manifest = read_manifest(out)
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {"truncated.jpg": "corrupt", "garbage.jpg": "corrupt", "empty.png": "zero-byte",
                       "notes.txt": "unsupported", "animation.webp.gif": "unsupported",
                       "gif_named.png": "unsupported", "dangling.jpg": "unreadable"}
    assert all(s["detail"] for s in manifest["skipped"])
    assert "truncated" in {s["path"]: s["detail"] for s in manifest["skipped"]}["truncated.jpg"]
    assert summary["skipped_reasons"] == {"corrupt": 2, "unreadable": 1, "unsupported": 3, "zero-byte": 1}
    # Nothing is dropped silently: every file is either a sample or a skipped entry.
    samples = read_back(out)
    assert manifest["num_samples"] + len(manifest["skipped"]) == len(input_files(src)) == 9
    assert {json.loads(s["json"])["source"]: [k for k in IMAGE_KEYS if k in s] for s in samples} == {
        "good.png": ["png"], "good_jpeg_named.png": ["jpg"]}


KILLED_PREP = """
import os, signal, sys
from webdataset.writer import TarWriter
from ssl_foundry.data_prep.images import prep_images

calls = 0
write_sample = TarWriter.write

def write_then_die(self, sample):
    global calls
    calls += 1
    if calls == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return write_sample(self, sample)

TarWriter.write = write_then_die
prep_images(sys.argv[1], sys.argv[2], shard_size=4, workers=1)
"""


def test_killed_prep_resumes_without_duplicates_or_half_tars(class_folder, tmp_path):
    out = tmp_path / "shards"
    # SIGKILL while writing the 11th sample: shards 0 and 1 are done, shard 2 is half written.
    killed = subprocess.run([sys.executable, "-c", KILLED_PREP, str(class_folder), str(out), "11"],
                            cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    interrupted = read_manifest(out, allow_incomplete=True)
    assert [s["complete"] for s in interrupted["shards"]] == [True, True, False, False]
    assert (out / "shard-000002.tar.tmp").exists() and not (out / "shard-000002.tar").exists()
    assert len(shard_paths(out, allow_incomplete=True)) == 2
    with pytest.raises(ManifestError, match="did not finish .2 of 4 shards.*rerun"):
        read_manifest(out)

    summary = prep_images(class_folder, out, shard_size=4, workers=2)
    assert (summary["shards_reused"], summary["shards_written"]) == (2, 2)
    assert_shards_verify(out)
    samples = read_back(out)
    assert [json.loads(s["json"])["source"] for s in samples] == input_files(class_folder)
    assert read_manifest(out)["created"] == interrupted["created"]


def test_rerun_rewrites_only_damaged_shards(class_folder, tmp_path):
    out = tmp_path / "shards"
    prep_images(class_folder, out, shard_size=4, workers=1)
    before = read_manifest(out)
    assert prep_images(class_folder, out, shard_size=4, workers=1)["shards_written"] == 0
    damaged = out / "shard-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1024])
    (out / "shard-000003.tar.tmp").write_bytes(b"left over by a crash")
    assert prep_images(class_folder, out, shard_size=4, workers=1)["shards_written"] == 1
    assert_shards_verify(out)
    assert read_manifest(out)["shards"] == before["shards"]  # fixed tar mtimes: identical bytes


def test_rerun_with_other_inputs_is_refused_unless_overwrite(class_folder, tmp_path):
    out = tmp_path / "shards"
    prep_images(class_folder, out, shard_size=4, workers=1)
    with pytest.raises(PrepError, match="different shard size.*--overwrite"):
        prep_images(class_folder, out, shard_size=5, workers=1)
    other = tmp_path / "other"
    save_image(other / "x.png", fashion_mnist_head("t10k", 1)[0][0], "PNG")
    with pytest.raises(PrepError, match="different source"):
        prep_images(other, out, shard_size=4, workers=1)
    (class_folder / "bag" / "new.png").write_bytes((class_folder / "bag" / "img00.png").read_bytes())
    with pytest.raises(PrepError, match="different set of inputs"):
        prep_images(class_folder, out, shard_size=4, workers=1)
    with pytest.raises(PrepError, match="inside SRC"):
        prep_images(class_folder, class_folder / "shards", workers=1)

    prep_images(class_folder, out, shard_size=10, workers=1, overwrite=True)
    assert [s["num_samples"] for s in read_manifest(out)["shards"]] == [10, 4]
    assert sorted(p.name for p in out.iterdir()) == [".foundry-prep.lock", "manifest.json", "shard-000000.idx",
                                                     "shard-000000.tar", "shard-000001.idx", "shard-000001.tar"]
    assert_shards_verify(out)


def test_every_shard_has_the_dali_index_that_wds2idx_writes(class_folder, tmp_path):
    """The index beside each shard is byte for byte what DALI's own tool makes of the tar."""
    out = tmp_path / "shards"
    prep_images(class_folder, out, shard_size=5, workers=2)
    wds2idx = Path(sys.executable).with_name("wds2idx")
    for path in shard_paths(out):
        reference = tmp_path / "reference.idx"
        subprocess.run([str(wds2idx), path, str(reference)], check=True, capture_output=True)
        assert Path(path).with_suffix(".idx").read_text() == reference.read_text()
    lines = (out / "shard-000000.idx").read_text().splitlines()
    assert lines[0] == "v1.2 5" and len(lines) == 6
    assert [field for field in lines[1].split() if not field.isdigit()][::2] == ["cls", "json", "png"]


def test_group_into_shards_by_count_and_bytes():
    assert group_into_shards(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    sizes = [4, 4, 4, 20, 1, 1, 1, 1]
    assert group_into_shards(sizes, 3, max_shard_bytes=10, size_of=lambda n: n) == [[4, 4], [4], [20], [1, 1, 1], [1]]


def test_fashion_mnist_slice_matches_idx_files(tmp_path):
    out = tmp_path / "fmnist"
    summaries = prep_fashion_mnist(out, shard_size=10, limit=25, workers=2)
    assert {split: s["samples"] for split, s in summaries.items()} == {"train": 25, "test": 25}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        manifest = read_manifest(out / split)
        assert manifest["labelled"] and manifest["classes"] == CLASSES
        assert [s["num_samples"] for s in manifest["shards"]] == [10, 10, 5]
        assert_shards_verify(out / split)
        pixels, labels = fashion_mnist_head(prefix, 25)
        samples = read_back(out / split)
        assert len(samples) == 25
        for index, sample in enumerate(samples):
            with Image.open(io.BytesIO(sample["png"])) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "L", (SIDE, SIDE))
                assert image.tobytes() == pixels[index]
            assert int(sample["cls"]) == labels[index]
            assert json.loads(sample["json"])["label"] == CLASSES[labels[index]]


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(PrepError, match="apt-get install dataset-fashion-mnist") as err:
        prep_fashion_mnist(tmp_path / "out", source_dir=tmp_path)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(err.value)


def test_read_manifest_names_folder_and_command(tmp_path):
    with pytest.raises(ManifestError, match=f"no shards at '{tmp_path}'.*foundry prep images"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read"):
        shard_paths(tmp_path)


def test_cli(class_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["prep", "images", str(class_folder), str(out), "--shard-size", "6", "--workers", "1"]) == 0
    assert "13 samples in 3 shards" in capsys.readouterr().out
    assert main(["prep", "images", str(tmp_path / "absent"), str(out)]) == 1
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prep", "fashion-mnist", str(out), "--shard-size", "0"])
