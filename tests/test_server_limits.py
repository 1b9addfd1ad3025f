"""The server's limits a user relies on when a thermostat is served on a LAN
(issue 21, items 7-9; issue 22, item 6): who may connect and who may change
things, a newcomer that always gets in, a total memory budget for every
client together, and connection lines kept out of a quiet log."""

import fcntl
import logging
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

import thermostat
from conftest import FAST, IndiClient, ServerProcess, free_port, new_number, tagged, wait_until

GET_ALL = '<getProperties version="1.7"/>'
UNFINISHED = b'<newBLOBVector device="Thermostat" name="x"><oneBLOB name="y" size="1" format=".csv">'


@pytest.fixture(autouse=True)
def fresh_throttle():
    "Warnings are throttled per minute across the whole run: each test starts with a fresh count."
    for throttle in logging.getLogger("thermostat").filters:
        if isinstance(throttle, thermostat.WarningThrottle):
            throttle.throttle = thermostat.Throttle()


def connect_from(source, port):
    "A socket to the server on 127.0.0.1, from another loopback address."
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def client_from(source, port):
    "An IndiClient connected from another loopback address."
    original = socket.create_connection
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "create_connection",
                      lambda address, timeout: original(address, timeout, source_address=(source, 0)))
        return IndiClient(port)


def closed_at_once(sock):
    "True if the server closed the connection without a word."
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def warnings(caplog, words):
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def getprop(port, spec="Thermostat.targetvector.target", timeout=5):
    "What indi_getprop prints for spec (empty if it was not answered)."
    done = subprocess.run(["indi_getprop", "-p", str(port), "-t", "2", spec],
                          capture_output=True, text=True, timeout=timeout + 10)
    return done.stdout


def stuck_sockets(port, count):
    "Connections that each send one getProperties and never read again."
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(GET_ALL.encode())
        socks.append(sock)
    return socks


# -- who may connect, who may change things ---------------------------------------

def test_a_connection_from_an_address_not_allowed_is_closed_and_logged_once_a_minute(in_process, caplog):
    caplog.set_level(logging.WARNING, logger="thermostat")
    server = thermostat.make_server(thermostat.make_driver(poll_interval=0.05), host="127.0.0.1",
                                    port=free_port(), allow="127.0.0.1,::1")
    running = in_process(server)
    for _ in range(3):
        stranger = connect_from("127.0.0.2", server.port)
        assert closed_at_once(stranger)
        stranger.close()
    allowed = running.client()
    allowed.send(GET_ALL)
    allowed.expect(tagged("defNumberVector", name="targetvector"))
    refusals = warnings(caplog, "not allowed")
    assert refusals == ["refused a connection from 127.0.0.2, which is not allowed (--allow)"]


def test_allowed_networks_take_ipv4_and_ipv6_addresses_and_networks():
    networks = thermostat.parse_networks("192.168.1.0/24, ::1,10.0.0.7")
    assert thermostat.in_networks("192.168.1.77", networks)
    assert thermostat.in_networks("::1", networks) and thermostat.in_networks("10.0.0.7", networks)
    assert thermostat.in_networks("::ffff:192.168.1.3", networks)      # IPv4 on an IPv6 socket
    assert not thermostat.in_networks("192.168.2.1", networks)
    assert not thermostat.in_networks("fe80::1%eth0", networks)
    with pytest.raises(ValueError, match="'192.168.1.x' is not an IP address or network"):
        thermostat.parse_networks("10.0.0.1,192.168.1.x")


def test_a_read_only_client_sees_everything_and_each_request_it_sends_is_refused_with_a_message(
        in_process, caplog):
    caplog.set_level(logging.WARNING, logger="thermostat")
    driver = thermostat.make_driver(poll_interval=0.05, target=20)
    server = thermostat.make_server(driver, host="127.0.0.1", port=free_port(), read_only="127.0.0.2")
    running = in_process(server)
    reader = client_from("127.0.0.2", server.port)
    reader.send(GET_ALL)
    reader.expect(tagged("defNumberVector", name="targetvector"))
    reader.expect(tagged("setNumberVector", name="temperaturevector"))   # the updates, too
    reader.send(new_number("Thermostat", "targetvector", "target", 30))
    refusal = reader.expect(tagged("message"))
    assert "127.0.0.2 may only read on this server" in refusal.get("message")
    assert refusal.get("device") == "Thermostat"
    thermostat_client = running.client()                     # from 127.0.0.1: it may
    thermostat_client.send(GET_ALL)
    target = thermostat_client.expect(tagged("defNumberVector", name="targetvector"))
    assert float(target.find("defNumber").text) == 20
    thermostat_client.send(new_number("Thermostat", "targetvector", "target", 25))
    changed = thermostat_client.expect(
        lambda e: e.tag == "setNumberVector" and e.get("name") == "targetvector")
    assert float(changed.find("oneNumber").text) == 25
    assert len(warnings(caplog, "read-only address")) == 1


def test_the_command_line_takes_allow_read_only_and_max_memory(capsys):
    args = thermostat.parse_args(["--allow", "127.0.0.1,192.168.1.0/24", "--read-only", "192.168.1.9",
                                  "--max-memory", "16"])
    assert args.allow == thermostat.parse_networks("127.0.0.1,192.168.1.0/24")
    assert args.read_only == thermostat.parse_networks("192.168.1.9") and args.max_memory == 16
    defaults = thermostat.parse_args([])
    assert defaults.allow is None and defaults.read_only is None
    assert defaults.max_memory == thermostat.DEFAULT_MAX_MEMORY_MIB
    with pytest.raises(SystemExit):
        thermostat.parse_args(["--allow", "192.168.1.x"])
    assert "argument --allow: '192.168.1.x' is not an IP address or network" in capsys.readouterr().err


# -- a newcomer always gets in -------------------------------------------------------

def test_fifty_connections_that_asked_once_and_never_read_keep_no_newcomer_out(served):
    server = served()                                        # the default limit
    stuck = stuck_sockets(server.port, 50)
    try:
        for _ in range(3):
            assert "Thermostat.targetvector.target=" in getprop(server.port)
    finally:
        for sock in stuck:
            sock.close()


def test_at_the_limit_the_connection_quiet_the_longest_makes_room_for_a_newcomer(served):
    server = served("--max-connections", "50")
    stuck = stuck_sockets(server.port, 50)
    try:
        for _ in range(3):
            assert "Thermostat.targetvector.target=" in getprop(server.port)
        log = server.stderr_text()
        assert log.count("to make room for") == 1 and "which has sent nothing for" in log
        stuck[0].settimeout(5)                                # the first to ask is the first to go
        received = b""
        while chunk := stuck[0].recv(1 << 16):
            received += chunk
        assert b"this connection has sent nothing for" in received
    finally:
        for sock in stuck:
            sock.close()


# -- a total memory budget -------------------------------------------------------------

def test_clients_holding_unfinished_elements_are_shed_largest_first_within_the_budget(in_process, caplog):
    caplog.set_level(logging.WARNING, logger="thermostat")
    budget = 1 << 20
    server = thermostat.make_server(thermostat.make_driver(poll_interval=0.05), port=free_port(),
                                    max_memory=budget)
    in_process(server)
    socks = []
    for size in (100_000, 200_000, 300_000, 400_000, 500_000):
        sock = socket.create_connection(("127.0.0.1", server.port))
        socks.append(sock)
        try:
            sock.sendall(UNFINISHED + b"A" * size)
        except OSError:
            pass                                             # shed while it sent
        shed = len(warnings(caplog, "held the most"))
        def read_or_shed(sock=sock, size=size, shed=shed):
            return (held_by(server, sock) or 0) >= size or len(warnings(caplog, "held the most")) > shed

        wait_until(read_or_shed, what="the element to be read")
        assert server.held_bytes <= budget
    wait_until(lambda: len(server.clients) == 3, what="the two largest to be shed")
    shed = warnings(caplog, "held the most")
    named = ["{}:{}".format(*sock.getsockname()) for sock in socks]
    assert len(shed) == 2 and f"client {named[3]}: disconnected" in shed[0]
    assert f"client {named[4]}: disconnected" in shed[1]
    assert sorted(client.held_input for client in server.clients) == [
        size + len(UNFINISHED) for size in (100_000, 200_000, 300_000)]
    for sock in socks:
        sock.close()


def test_clients_that_flood_requests_without_reading_are_held_within_the_budget(in_process, caplog):
    caplog.set_level(logging.WARNING, logger="thermostat")
    budget = 1 << 20
    server = thermostat.make_server(thermostat.make_driver(poll_interval=0.05), port=free_port(),
                                    max_memory=budget)
    in_process(server)
    socks = []
    for _ in range(5):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        socks.append(sock)
    flood = (GET_ALL * 50).encode()
    deadline = time.monotonic() + 20
    while not warnings(caplog, "held the most") and time.monotonic() < deadline:
        for sock in socks:
            try:
                sock.send(flood)
            except OSError:
                pass                                         # full, or shed
        assert server.held_bytes <= budget + 65536           # within one element of it at most
        time.sleep(0.001)
    assert warnings(caplog, "held the most"), "a flooding client was shed"
    # the warning is logged just before the client is closed, in the server's thread: wait for the close
    wait_until(lambda: server.held_bytes <= budget, timeout=2, what="the server back within its budget")
    for sock in socks:
        sock.close()


def held_by(server, sock):
    "The bytes the server holds of a client's unfinished element; None once it is disconnected."
    address = "{}:{}".format(*sock.getsockname())
    return next((c.held_input for c in list(server.clients) if c.address == address), None)


def delivered(sock):
    "True once all a socket sent reached its peer (Linux's SIOCOUTQ), or the peer closed it."
    try:
        if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
            return True
    except BlockingIOError:
        pass
    except OSError:
        return True
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0] == 0


def peak_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


def test_the_server_s_peak_memory_under_fifty_unfinished_elements_stays_near_its_budget():
    server = ServerProcess(*FAST, "--no-config", "--max-memory", "8")
    try:
        before = peak_mib(server.process.pid)
        socks = []
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", server.port))
            try:
                sock.sendall(UNFINISHED + b"A" * (2 << 20))   # 100 MiB in all
            except OSError:
                pass                                          # shed
            socks.append(sock)
        wait_until(lambda: all(map(delivered, socks)), timeout=30, what="the server to read all")
        assert "held the most" in server.stderr_text()
        grown = peak_mib(server.process.pid) - before
        print(f"peak grew by {grown:.0f} MiB against a budget of 8 MiB")
        assert grown < 40
        for sock in socks:
            sock.close()
    finally:
        server.stop()


# -- a quiet log -------------------------------------------------------------------------

def test_client_connections_are_logged_only_with_verbose():
    for options, logged in (((), False), (("-v",), True)):
        server = ServerProcess(*FAST, "--no-config", *options)
        try:
            client = server.client()
            client.send(GET_ALL)
            client.expect(tagged("defNumberVector", name="targetvector"))
            client.close()
            if logged:
                wait_until(lambda server=server: " disconnected" in server.stderr_text(), what="the line")
            else:
                other = server.client()                       # the first one's end is handled
                other.send(GET_ALL)
                other.expect(tagged("defNumberVector", name="targetvector"))
        finally:
            server.stop()
        assert (" connected" in server.stderr) == logged and (" disconnected" in server.stderr) == logged
