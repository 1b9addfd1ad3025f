"""The module's structure as its maintainers rely on it: three parts, Part II
standing without Part I, foundation privates only in the fence, an import
that changes nothing outside the module, and a clean linter."""

import ast
import asyncio
import importlib.util
import logging
import re
import subprocess
import sys
import threading

from conftest import ROOT, IndiClient, free_port, tagged, wait_for_port

SOURCE = (ROOT / "thermostat.py").read_text()
LINES = SOURCE.splitlines()


def banner_line(title):
    "The line number (1-based) of a section banner."
    (number,) = [n for n, line in enumerate(LINES, 1) if line.startswith(f"# {title}")]
    return number


def test_the_three_parts_come_in_order_with_the_fence_last_in_part_two():
    part_one, part_two = banner_line("PART I:"), banner_line("PART II:")
    fence, part_three = banner_line("THE FENCE"), banner_line("PART III:")
    assert part_one < part_two < fence < part_three


def foundation_privates():
    "The private names the foundation's classes have, or set on themselves."
    import indipydriver.ipydriver
    import indipydriver.propertyvectors
    import indipyserver.exdriver
    import indipyserver.ipyserver
    import indipyserver.remote

    names = set()
    for module in (indipydriver.ipydriver, indipydriver.propertyvectors, indipyserver.ipyserver,
                   indipyserver.exdriver, indipyserver.remote):  # fmt: skip
        text = open(module.__file__).read()
        names |= set(re.findall(r"self\.(_[a-z]\w*)", text))
        names |= set(re.findall(r"def (_[a-z]\w*)", text))
    return names


def test_no_private_of_the_foundation_is_used_outside_the_fence():
    privates = foundation_privates()
    assert {"_readdata", "_commsobj", "_stop", "_message"} <= privates, "the scan finds them"
    fence, part_three = banner_line("THE FENCE"), banner_line("PART III:")
    outside = []
    for node in ast.walk(ast.parse(SOURCE)):
        name = getattr(node, "attr", None) or (
            node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        )
        if name in privates and not fence <= node.lineno < part_three:
            outside.append(f"line {node.lineno}: {name}")
    assert not outside


def part_two_alone():
    "The module's header (imports, logger) and Part II, without Part I or Part III."
    header = "\n".join(LINES[: banner_line("PART I:") - 2])
    part_two = "\n".join(LINES[banner_line("PART II:") - 2 : banner_line("PART III:") - 2])
    return header + "\n\n" + part_two + "\n"


def test_part_two_alone_serves_a_plain_indipydriver_driver(tmp_path):
    path = tmp_path / "indikit.py"
    path.write_text(part_two_alone())
    spec = importlib.util.spec_from_file_location("indikit", path)
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    assert not hasattr(kit, "ThermoDriver") and not hasattr(kit, "make_driver")

    from indipydriver import Device, IPyDriver, NumberMember, NumberVector

    class Lamp(IPyDriver):
        async def rxevent(self, event):
            event.vector["watts"] = event["watts"]
            await event.vector.send_setVector(state="Ok")

    vector = NumberVector("power", "Power", "Main", "rw", "Ok",
                          [NumberMember("watts", "Watts", min=0, max=100, membervalue=5)])  # fmt: skip
    port = free_port()
    server = kit.IndiServer(Lamp(Device("Lamp", [vector])), host="127.0.0.1", port=port)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.asyncrun(),))
    thread.start()
    try:
        wait_for_port(port)
        client = IndiClient(port)
        client.send('<getProperties version="1.7"/>')
        client.expect(tagged("defNumberVector", device="Lamp", name="power"))
        client.send('<newNumberVector device="Lamp" name="power">'
                    '<oneNumber name="watts">42</oneNumber></newNumberVector>')  # fmt: skip
        answer = client.expect(tagged("setNumberVector", device="Lamp", name="power"))
        assert answer.find("oneNumber").text.strip() == "42"
        client.close()
    finally:
        loop.call_soon_threadsafe(server.shutdown)
        thread.join(10)
        loop.close()
    assert not thread.is_alive()


LOGGER_STATE = """
import asyncio, logging, sys
import indipydriver, indipyserver, indipyserver.exdriver, indipyserver.remote

def state():
    loggers = {"": logging.getLogger()}
    loggers.update({name: logging.getLogger(name) for name in list(logging.root.manager.loggerDict)})
    return {name: (log.level, list(log.filters), list(log.handlers))
            for name, log in loggers.items() if isinstance(log, logging.Logger)}

before = state()
sys.path.insert(0, sys.argv[1])
import thermostat
after = state()
changed = sorted(name for name in before if before[name] != after.get(name))
added = sorted(name for name in after if name not in before and not name.startswith("thermostat")
               and (after[name][1] or after[name][2] or after[name][0]))
print(changed, added)
"""


def test_importing_the_module_changes_no_logger_but_its_own():
    result = subprocess.run([sys.executable, "-c", LOGGER_STATE, str(ROOT)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []", result.stdout


def test_debug_gives_indipydriver_s_logger_its_level_back():
    import thermostat

    foundation = logging.getLogger("indipydriver.ipydriver")
    foundation.setLevel(logging.ERROR)
    try:
        first, second = thermostat.make_driver(config=None), thermostat.make_driver("Other", config=None)
        first.debug.set(True)
        second.debug.set(True)
        assert foundation.level == logging.DEBUG
        first.debug.set(False)
        assert foundation.level == logging.DEBUG, "the other driver still has DEBUG on"
        second.debug.set(False)
        assert foundation.level == logging.ERROR
    finally:
        foundation.setLevel(logging.NOTSET)


def test_the_public_api_is_named_in_all():
    import thermostat

    assert 10 <= len(thermostat.__all__) <= 20
    assert all(hasattr(thermostat, name) for name in thermostat.__all__)
    assert thermostat.ThermoServer is thermostat.IndiServer


def test_the_code_is_clean_under_ruff():
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "thermostat.py", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr
    formatted = subprocess.run([sys.executable, "-m", "ruff", "format", "--check", "thermostat.py"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
