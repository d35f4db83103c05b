"""A check shared by the embedding-set tests: two batches hold the same items, exactly, in the stored dtypes."""

from __future__ import annotations

import numpy as np

from fct_registry.vectors.batch import EmbeddingBatch


def assert_batches_equal(got: EmbeddingBatch, want: EmbeddingBatch) -> None:
    assert got.ids.dtype == np.int64 and got.labels.dtype == np.int64
    assert got.embeddings.dtype == np.float32 and got.embeddings.flags.c_contiguous
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.embeddings, want.embeddings)
    if want.side_info is None:
        assert got.side_info is None
    else:
        assert got.side_info.dtype == np.float32
        np.testing.assert_array_equal(got.side_info, want.side_info)
    for name, dtype in (("uncertainty", np.float32), ("backfilled", np.bool_)):
        if getattr(want, name) is None:
            assert getattr(got, name) is None, name
        else:
            assert getattr(got, name).dtype == dtype, name
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
