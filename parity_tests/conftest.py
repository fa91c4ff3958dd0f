"""Fixtures: tiny random HF GPT-2 models and their checkpoints on disk, built offline.

  shape                 parametrized over checkpoints.SHAPES (ids tiny, odd, deep): a Shape
  hf_model              the random GPT2LMHeadModel (eval) of `shape`; shared by the session, do not
                        modify it (tests that train should build their own with make_hf_model)
  checkpoint_dir        factory: checkpoint_dir(layout, shape_name="tiny") -> Path of a directory
                        holding that shape's hf_model saved in `layout` (see checkpoints.LAYOUTS);
                        written once per session, treat as read-only (copy_checkpoint to modify)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from parity_tests.checkpoints import SHAPES, checkpoint_dirs, get_hf_model  # noqa: E402

# One intra-op thread: these models are tiny, and on a 2-core machine two threads
# made small ops ~100x slower (measured: an (8, 48) @ (48, 48) matmul 8 us -> 1.1 ms, a tiny
# train step 10 ms -> 0.2-1.7 s), presumably when the second core is busy elsewhere.
torch.set_num_threads(1)


def _quiet_transformers():
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars


_quiet_transformers()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """Every parity test compares with torch or transformers: all are marked torch."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.torch)


@pytest.fixture(scope="session", params=SHAPES, ids=[s.name for s in SHAPES])
def shape(request):
    return request.param


@pytest.fixture(scope="session")
def hf_model(shape):
    return get_hf_model(shape.name)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return checkpoint_dirs(tmp_path_factory)
