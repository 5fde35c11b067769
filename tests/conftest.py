import pytest

from edge_agent.broker import EmbeddedBroker, find_mosquitto, free_port


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
