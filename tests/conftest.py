"""Shared fixtures: a tiny synthetic station, tiny trained models (built once per test session)
and a real mosquitto broker on a free loopback port."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.broker import EmbeddedBroker, find_mosquitto, free_port
from edge_agent.synth import write_dataset
from edge_agent.train.fit import TrainOptions, fit


@pytest.fixture(scope="session")
def station(tmp_path_factory) -> Path:
    """data/{train/good 8, calib/good 6, test/good 6, test/defect 6, test/masks} of 128x128 parts."""
    root = tmp_path_factory.mktemp("station")
    write_dataset(root, n_train=8, n_calib=6, n_test_good=6, n_test_defect=6, seed=1)
    return root


def tiny_options(**kw) -> TrainOptions:
    base = dict(patch_size=32, stride=16, nc=4, nz=4, batch_size=16, epochs=1, min_steps=1, seed=0, device="cpu",
                precision="fp32", progress=False)
    base.update(kw)
    return TrainOptions(**base)


@pytest.fixture(scope="session")
def vae_model(station, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "vae.pt"
    fit(station / "train/good", out, tiny_options(model="vae"))
    return out


@pytest.fixture(scope="session")
def ae_model(station, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "ae.pt"
    fit(station / "train/good", out, tiny_options(model="ae"))
    return out


@pytest.fixture
def mosquitto():
    """A real mosquitto on a free 127.0.0.1 port: `.port`, `.host`, `.stop()`, `.start()` (same port).

    Function-scoped so an outage test cannot leave the broker down for the next test.
    """
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt install mosquitto); integration test needs a real broker")
    broker = EmbeddedBroker(free_port())
    broker.start()
    yield broker
    broker.stop()
