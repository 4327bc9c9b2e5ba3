"""The runtime's class order is the same on every CPU: equal scores (INT8 models give exactly equal logits now and
then) rank in index order, the first being argmax. Found by scripts/arm64-check.sh: x86 and arm64 computed
bit-identical INT8 logits for these two Fashion-MNIST test images, yet `predict` named different classes."""
from __future__ import annotations

import numpy as np
import pytest

from exporters.runtime import _softmax, rank_classes


# model_int8.onnx logits of two real test images (runs of issue 26; classes 4 and 6, and 5 and 7, tie exactly)
TIED = [
    [1.0355206727981567, 0.38832026720046997, 0.9708006381988525, 2.2652015686035156, 2.7182416915893555,
     -3.8184823989868164, 2.7182416915893555, -5.7600836753845215, -0.9060806035995483, -2.200481414794922],
    [-2.394641637802124, -7.5075249671936035, -1.5532810688018799, -3.3654422760009766, -1.618001103401184,
     5.371763706207275, -0.9708006381988525, 5.371763706207275, 0.5177603363990784, 2.200481414794922],
]


@pytest.mark.parametrize("logits", TIED)
def test_ties_rank_in_index_order_as_argmax(logits):
    probs = _softmax(np.asarray([logits], dtype=np.float32))[0]
    order = rank_classes(probs)
    assert order[0] == np.argmax(probs)
    assert [int(i) for i in order[:2]] == sorted(int(i) for i in np.flatnonzero(probs == probs.max()))
    assert sorted(order.tolist()) == list(range(10)) and np.all(np.diff(probs[order]) <= 0)
