import pytest

from palsctl.paths import data_dir


@pytest.fixture(scope="session")
def shared_data():
    """The shared data folder (traces, measurements). CI has it beside the clone."""
    d = data_dir()
    if d is None:
        pytest.skip("shared data folder not found (set PALSCTL_DATA)")
    return d
