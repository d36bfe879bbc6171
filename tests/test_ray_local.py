"""The local Ray head (yanjax/data/ray_local.py): its port is chosen where other processes' connections do not land,
and a port taken between choosing it and the head binding it costs a second start on another port (Ray takes
~40 s to give up on the first), not the run."""

import socket

import pytest

from yanjax.data import ray_local


@pytest.mark.slow
def test_head_starts_on_another_port_when_its_port_is_taken(monkeypatch):
  with socket.socket() as taken:
    taken.bind((ray_local.HOST, 0))
    taken.listen()
    ports = [taken.getsockname()[1]]  # the first port handed out is already bound and listening
    real = ray_local.free_port
    monkeypatch.setattr(ray_local, "free_port", lambda: ports.pop() if ports else real())
    with ray_local.head_node(1) as address:
      assert address != f"{ray_local.HOST}:{taken.getsockname()[1]}"
      with socket.create_connection(address.split(":"), timeout=5):  # the head's GCS accepts connections
        pass


def test_free_port_is_below_the_kernels_outgoing_ports():
  """The head's port comes from below the ephemeral range, where no other process's client connection lands."""
  first, _ = ray_local.ephemeral_ports()
  for _ in range(5):
    port = ray_local.free_port()
    if first > ray_local.QUIET_PORTS.start:  # else this host leaves no quiet port: the kernel's choice is taken
      assert port in ray_local.QUIET_PORTS and port < first
    with socket.socket() as probe:
      probe.bind((ray_local.HOST, port))  # free
