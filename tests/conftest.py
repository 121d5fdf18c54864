import pytest

from cluster.slurm import ClusterUnavailable, SlurmCluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node Slurm cluster for this test session (skips with the reason if impossible).
    While it runs, this process's environment points at it, so in-process submitit submits to it."""
    try:
        cluster = SlurmCluster.start()
    except ClusterUnavailable as reason:
        pytest.skip(str(reason))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in cluster.env.items():
            patch.setenv(key, value)
        try:
            yield cluster
        finally:
            cluster.stop()
