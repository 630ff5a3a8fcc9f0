"""Per-peer transport paths: the socket table a rank reads, and how rows are derived from it."""
import socket

from collafuse_mpi import netpath


def test_an_open_tcp_connection_is_in_the_socket_table():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    try:
        rows = netpath.tcp_connections()
        port = srv.getsockname()[1]
        assert ("127.0.0.1", cli.getsockname()[1], "127.0.0.1", port) in rows
        assert ("127.0.0.1", port, "127.0.0.1", cli.getsockname()[1]) in rows  # the accepted end too
    finally:
        cli.close()
        conn.close()
        srv.close()
    assert "127.0.0.1" in netpath.addresses() and netpath.addresses()["127.0.0.1"] == "lo"


def _rank(rank, host, ip, same, tcp):
    return {"rank": rank, "host": host, "same_node": same,
            "net": {"addresses": {"127.0.0.1": "lo", ip: "eth0"}, "tcp": tcp}}


def test_rows_name_same_node_tcp_and_unconnected_peers():
    """Ranks 0 and 1 share host a (MPI's locality says so); rank 2 on host b talks TCP to rank 0
    only; rank 3 on host c has no socket to anyone (a fabric, or never talked)."""
    everyone = [
        _rank(0, "a", "10.0.0.1", [0, 1], [("10.0.0.1", 1000, "10.0.0.2", 2000)]),
        _rank(1, "a", "10.0.0.1", [0, 1], []),
        _rank(2, "b", "10.0.0.2", [2], [("10.0.0.2", 2000, "10.0.0.1", 1000)]),
        _rank(3, "c", "10.0.0.3", [3], []),
    ]
    t = netpath.peer_paths(everyone)
    assert [r[0] for r in t[0]] == [1, 2, 3]
    assert t[0][0][1:4] == ("a", "same node", "shared memory")
    assert t[0][1] == (2, "b", "other node", "tcp via eth0", "10.0.0.1:1000", "10.0.0.2:2000")
    assert t[0][2][2] == "other node" and t[0][2][3].startswith("network: no TCP connection")
    assert t[2][0] == (0, "a", "other node", "tcp via eth0", "10.0.0.2:2000", "10.0.0.1:1000")
    # rank 2's one connection goes to host a: rank 1 shares that host, and the table says so
    assert t[2][1][3] == "tcp via eth0"
    assert all(r[3].startswith("network: no TCP") for r in t[3])
