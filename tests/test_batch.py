"""lvit.inference.batch: images read ahead of the network and masks written behind it, in order, with every
broken image and every failed write accounted for."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from lvit.commands.cli import main
from lvit.inference.batch import BackgroundCalls, segment_images


class _FakeSegmenter:
    """Answers with the image's mean as a constant map; records the batches it saw and the reading thread."""

    uses_text = True

    def __init__(self):
        self.batches = []

    def predict_many(self, images, texts):
        self.batches.append(list(texts))
        return [np.full(im.shape[:2], im.mean() / 255.0, np.float32) for im in images]


def _images(tmp_path, n, broken=()):
    pairs = []
    for k in range(n):
        path = tmp_path / f"{k:02d}.png"
        if k in broken:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(np.full((16, 16), 10 * k, np.uint8)).save(path)
        pairs.append((path, f"report {k}"))
    return pairs


def test_images_come_out_in_order_with_broken_ones_noted(tmp_path):
    pairs = _images(tmp_path, 7, broken={2, 3})
    segmenter, failed = _FakeSegmenter(), []
    out = list(segment_images(segmenter, pairs, 2, False, failed, progress=False))
    assert [p.name for p, *_ in out] == ["00.png", "01.png", "04.png", "05.png", "06.png"]
    assert [r for *_, r in out] == ["report 0", "report 1", "report 4", "report 5", "report 6"]
    assert [prob[0, 0] for _, _, prob, _ in out] == pytest.approx([0.0, 10 / 255, 40 / 255, 50 / 255, 60 / 255])
    assert [name for name, _ in failed] == ["02.png", "03.png"]
    assert all("not" in why or "read" in why or "image" in why for _, why in failed)
    assert segmenter.batches == [["report 0", "report 1"], ["report 4", "report 5"], ["report 6"]]  # 2nd: both broken


def test_the_next_batch_is_read_while_the_current_one_runs(tmp_path):
    pairs = _images(tmp_path, 4)
    seen = []

    class Slow(_FakeSegmenter):
        def predict_many(self, images, texts):
            seen.append(threading.active_count())
            time.sleep(0.05)
            return super().predict_many(images, texts)

    list(segment_images(Slow(), pairs, 2, False, [], progress=False))
    assert max(seen) >= 2  # a reader thread was alive beside the network


def test_background_calls_run_in_order_and_all_finish_before_the_block_ends():
    done = []
    with BackgroundCalls(pending=2) as calls:
        for k in range(20):
            calls.submit(lambda k=k: (time.sleep(0.001), done.append(k)))
    assert done == list(range(20))


def test_a_failed_background_call_raises_in_the_caller():
    def fail():
        raise OSError("disk full")

    after = []
    with pytest.raises(OSError, match="disk full"):
        with BackgroundCalls(pending=1) as calls:
            calls.submit(fail)
            for k in range(5):
                calls.submit(after.append, k)
    assert after == []  # nothing runs after the first failure
    with pytest.raises(OSError, match="disk full"):  # the last call fails: raised on leaving the block
        with BackgroundCalls() as calls:
            calls.submit(fail)


def test_leaving_on_an_error_drops_the_calls_not_started():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with BackgroundCalls(pending=100) as calls:
            calls.submit(time.sleep, 0.1)
            for k in range(10):
                calls.submit(done.append, k)
            raise KeyboardInterrupt
    assert done == []


def test_a_full_disk_while_saving_a_folder_is_one_line_and_stops(tmp_path, monkeypatch, capsys):
    """The masks are saved on a background thread: a write failure still ends the command with its message."""
    from lvit.core import io as lio

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(5):
        Image.fromarray(np.full((16, 16), 30 * k, np.uint8)).save(folder / f"{k}.png")
    table = tmp_path / "reports.csv"
    table.write_text("Image,Description\n" + "".join(
        f'{k}.png,"unilateral pulmonary infection, one infected area, lower left lung."\n' for k in range(5)))
    monkeypatch.setenv(lio.FAULT_ENV, "enospc=3.png")
    code = main(["predict", "qata-lvit", "--images", str(folder), "--reports", str(table), "--out",
                 str(tmp_path / "out"), "--no-progress", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code != 0
    assert "3.png" in err and "No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["0.png", "1.png", "2.png"]


def test_a_full_disk_while_lvit_test_saves_its_masks_is_one_line(shared_dir, tmp_path, monkeypatch, capsys):
    """lvit test writes its masks on a background thread too: a failed write ends the command with its message,
    and no metrics.json claims a finished test."""
    from lvit.core import io as lio

    monkeypatch.setenv(lio.FAULT_ENV, "enospc=*.png")
    code = main(["test", "qata-lvit", "--data", str(shared_dir / "datasets" / "QaTa-COV19-sample"), "--out",
                 str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert "No space left on device" in err and ".png" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()
