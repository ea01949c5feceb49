"""build_result: the class outputs of every head, exact and unavailable rows alike."""

from __future__ import annotations

import numpy as np
from runtime_harness import TinyModel

from runtime.batcher import Answers
from runtime.manifest import Manifest, class_output, logits_output
from runtime.model_io import build_result


def _answers(manifest: Manifest, logits: dict[str, np.ndarray], unavailable: tuple[str, ...] = ()
             ) -> Answers:
    rows = len(next(iter(logits.values())))
    return Answers(logits, np.zeros(rows, np.bool_), unavailable)


def test_classes_are_each_rows_argmax(tiny: TinyModel) -> None:
    manifest = Manifest.load(tiny.bundle)
    rng = np.random.default_rng(0)
    logits = {h.task: rng.standard_normal((5, len(h.classes))).astype(np.float32)
              for h in manifest.heads}
    result = build_result(manifest, _answers(manifest, logits))
    for task, values in logits.items():
        classes = result.tensors[class_output(task)]
        assert classes.dtype == np.int64
        np.testing.assert_array_equal(classes, values.argmax(axis=1))
        assert result.tensors[logits_output(task)] is values


def test_unavailable_rows_get_class_minus_one_and_the_others_their_argmax(tiny: TinyModel) -> None:
    manifest = Manifest.load(tiny.bundle)
    rng = np.random.default_rng(1)
    head = manifest.heads[-1]
    values = rng.standard_normal((4, len(head.classes))).astype(np.float32)
    values[[1, 3]] = np.nan  # e.g. ParM: a decoded query's non-primary head
    logits = {h.task: (values if h is head else
                       rng.standard_normal((4, len(h.classes))).astype(np.float32))
              for h in manifest.heads}
    classes = build_result(manifest, _answers(manifest, logits, (head.task,))).tensors[
        class_output(head.task)]
    assert classes.tolist() == [int(values[0].argmax()), -1, int(values[2].argmax()), -1]
