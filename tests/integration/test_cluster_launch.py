"""dist_init.py's multi-node decisions that need no second node: the
rendezvous name check, the interface towards an address, which peer an
error names, and the timeout new process groups get. The decisions end to
end, across emulated nodes, are in tests/integration/cluster/."""

from __future__ import annotations

import datetime
import os
import socket
import threading

import pytest
from mpi4py import MPI

from prelora_hpc import dist_init


def test_rendezvous_name_that_does_not_resolve_ends_the_job_with_one_line(capsys):
    comm = MPI.COMM_WORLD
    with pytest.raises(SystemExit) as e:
        dist_init._check_rendezvous(comm, "no-such-node.invalid")
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[rank 0] error: the rendezvous name "
                                               "'no-such-node.invalid' (rank 0's node) on ")
    assert "does not resolve" in err[0] and "PRELORA_MASTER_ADDR" in err[0]


def test_rendezvous_name_on_the_loopback_is_refused(capsys):
    # Debian's "127.0.1.1 HOSTNAME": another node would dial itself.
    with pytest.raises(SystemExit):
        dist_init._check_rendezvous(MPI.COMM_WORLD, "localhost")
    assert "resolves to the loopback address 127." in capsys.readouterr().err


def test_rendezvous_name_that_resolves_gives_its_address():
    addr = dist_init.source_address("192.0.2.1")          # this machine's address on its default route
    if addr is None or addr.startswith("127."):
        pytest.skip("no network route on this machine")
    assert dist_init._check_rendezvous(MPI.COMM_WORLD, addr) == addr


def test_interface_towards_an_address():
    assert dist_init.interface_for("127.0.0.1") == "lo"
    addr = dist_init.source_address("192.0.2.1")
    if addr is None:
        pytest.skip("no network route on this machine")
    name = dist_init.interface_for(addr)
    assert name is not None and name != ""


def test_lost_peer_is_named_from_the_address_in_the_error(monkeypatch):
    monkeypatch.setattr(dist_init, "_PEERS", {"10.0.0.1": ("n0", [0, 1]), "10.0.0.2": ("n1", [2, 3]),
                                           "10.0.0.3": ("n2", [5])})
    gloo = ("[gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:41234: Connection reset "
            "by peer. This is typically caused by a remote worker hanging")
    assert dist_init.describe_lost_peer(gloo) == "ranks 2-3 on n1 (10.0.0.2)"
    assert dist_init.describe_lost_peer("Connection closed by peer [10.0.0.3]:9") == "rank 5 on n2 (10.0.0.3)"
    assert dist_init.describe_lost_peer("Read error [10.9.9.9]:1: reset") is None
    # A rank on this node that closed its sockets: no node is named.
    monkeypatch.setitem(dist_init._PEERS, "10.0.0.4", (socket.gethostname(), [6, 7]))
    assert dist_init.describe_lost_peer("Connection closed by peer [10.0.0.4]:9") is None
    assert dist_init.describe_lost_peer("Timed out waiting 20000ms for send operation") is None
    assert dist_init._ranks_text([4, 0, 2]) == "ranks 0,2,4"


def test_silent_peers_are_the_nodes_that_do_not_answer(monkeypatch):
    port = dist_init._answering_socket("127.0.0.1")
    # 192.0.2.1 (TEST-NET-1) is never routed anywhere: no answer.
    monkeypatch.setattr(dist_init, "_PEERS", {"127.0.0.1": ("up", [2, 3]), "192.0.2.1": ("gone", [4, 5])})
    monkeypatch.setattr(dist_init, "_ANSWER_PORTS", {"127.0.0.1": port, "192.0.2.1": port})
    assert dist_init.silent_peers(timeout_s=1.0) == ["ranks 4-5 on gone (192.0.2.1)"]


def test_peer_trouble_says_which_peer_and_how(monkeypatch):
    port = dist_init._answering_socket("127.0.0.1")
    monkeypatch.setattr(dist_init, "_PEERS", {"127.0.0.1": ("up", [0, 1]), "192.0.2.1": ("gone", [2, 3])})
    monkeypatch.setattr(dist_init, "_ANSWER_PORTS", {"127.0.0.1": port, "192.0.2.1": port})
    monkeypatch.setattr(dist_init, "PROBE_TIMEOUT_S", 1.0)
    assert (dist_init.peer_trouble("Read error [192.0.2.1]:41234: Connection reset by peer")
            == "lost contact with ranks 2-3 on gone (192.0.2.1)")
    assert (dist_init.peer_trouble("Timed out waiting 15000ms for send operation to complete")
            == "no answer from ranks 2-3 on gone (192.0.2.1)")
    # A rank beside this one quit over the silent node first: its closed
    # socket has this node's address, and the probe still names the node.
    monkeypatch.setitem(dist_init._PEERS, "10.0.0.4", (socket.gethostname(), [4, 5]))
    assert (dist_init.peer_trouble("Connection closed by peer [10.0.0.4]:29590")
            == "no answer from ranks 2-3 on gone (192.0.2.1)")
    monkeypatch.setattr(dist_init, "_ANSWER_PORTS", {"127.0.0.1": port})
    assert dist_init.peer_trouble("Timed out waiting 15000ms for send operation to complete") is None


def test_an_aborting_rank_waits_until_its_last_lines_are_read():
    """MPI_Abort tears the job down, and the launcher drops what it has not
    read of a rank's pipes: abort() waits for the reader first."""
    r, w = os.pipe()
    with os.fdopen(w, "w") as out, os.fdopen(r, "rb") as reader:
        out.write("no answer from ranks 2-3 on emu1\n" * 100)
        assert not dist_init.wait_for_output_read(0.2, [out])    # nobody reads: gives up
        got = []
        t = threading.Thread(target=lambda: got.append(reader.read1(1 << 16)), daemon=True)
        t.start()
        assert dist_init.wait_for_output_read(5.0, [out])
        # The pipe is empty once the kernel has handed its bytes over, which
        # can be before the reader thread has stored them.
        t.join(5.0)
        assert got and got[0].count(b"\n") == 100


def test_new_process_groups_get_the_job_timeout(monkeypatch):
    from torch.distributed import distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), datetime.timedelta):
            monkeypatch.setattr(c10d, name, getattr(c10d, name))     # restored afterwards
    dist_init._bound_new_groups(42)
    assert c10d._get_default_timeout("gloo") == datetime.timedelta(seconds=42)
