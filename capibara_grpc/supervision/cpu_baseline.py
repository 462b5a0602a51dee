"""Find x86-64 instructions beyond the install's baseline (AVX2 + FMA + F16C + BMI2) in a binary.

A llama.cpp built with -march=native on a CPU with AVX-512 or AMX runs on that machine and dies
with SIGILL on the next one. Running it here proves nothing, so the install check and the tests
read the machine code instead: `objdump -d`, then every instruction that is
- EVEX-encoded (first opcode byte 0x62 in 64-bit mode: the whole AVX-512 family, zmm registers,
  opmasks, and the 256-bit AVX512VL forms alike), or
- one of the VEX-encoded extensions newer than Haswell (AMX tiles, AVX-VNNI, AVX-IFMA,
  AVX-NE-CONVERT, AVX-VNNI-INT8/16).

Libraries that llama.cpp loads only after checking the CPU (GGML_BACKEND_DL variants such as
libggml-cpu-skylakex.so) are runtime-dispatched and skipped.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess

# Mnemonic prefixes of VEX-encoded instructions beyond Haswell. (EVEX ones are found by encoding.)
BEYOND_BASELINE_MNEMONICS = (
    "tile",
    "ldtilecfg",
    "sttilecfg",
    "tdpb",
    "tdpfp16ps",
    "tcmmimfp16ps",
    "tcmmrlfp16ps",  # AMX
    "vpdpbusd",
    "vpdpwssd",  # AVX-VNNI (the EVEX forms are AVX512-VNNI)
    "vpdpbssd",
    "vpdpbsud",
    "vpdpbuud",
    "vpdpwsud",
    "vpdpwusd",
    "vpdpwuud",  # AVX-VNNI-INT8/INT16
    "vpmadd52",  # AVX-IFMA
    "vbcstnesh2ps",
    "vbcstnebf162ps",
    "vcvtneebf162ps",
    "vcvtneeph2ps",
    "vcvtneobf162ps",
    "vcvtneoph2ps",
    "vcvtneps2bf16",  # AVX-NE-CONVERT
)
LEGACY_PREFIXES = {"f0", "f2", "f3", "2e", "36", "3e", "26", "64", "65", "66", "67"}
# GGML_BACKEND_DL CPU variants that need no more than the baseline; others are loaded only on a CPU
# that has what they need.
BASELINE_VARIANTS = ("x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell")

_INSTRUCTION = re.compile(r"^\s+[0-9a-f]+:\t([0-9a-f]{2}(?: [0-9a-f]{2})*)\s*\t(\S+)(.*)$")
_FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")


@dataclasses.dataclass
class Finding:
    function: str
    instruction: str
    why: str


def _classify(raw_bytes: str, mnemonic: str) -> str | None:
    opcode = next((b for b in raw_bytes.split() if b not in LEGACY_PREFIXES), "")
    if opcode == "62":
        return "EVEX (AVX-512)"
    name = mnemonic.removeprefix("{vex}").strip()
    if name.startswith(BEYOND_BASELINE_MNEMONICS):
        return "beyond AVX2 (AMX / AVX-VNNI / AVX-IFMA / AVX-NE-CONVERT)"
    return None


def scan_disassembly(lines) -> list[Finding]:
    findings, function = [], "?"
    for line in lines:
        header = _FUNCTION.match(line)
        if header:
            function = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        raw_bytes, mnemonic, operands = match.groups()
        if mnemonic == "{vex}":  # objdump prints "{vex} vpdpbusd ..." as two words
            mnemonic, _, operands = operands.strip().partition(" ")
        why = _classify(raw_bytes, mnemonic)
        if why:
            findings.append(Finding(function, f"{mnemonic} {operands.strip()}".strip(), why))
    return findings


def scan_file(path: pathlib.Path) -> list[Finding]:
    """Instructions beyond the baseline in one ELF file (executable or shared library)."""
    # --wide: every instruction's bytes on one line (long ones otherwise wrap onto a second line).
    process = subprocess.Popen(
        ["objdump", "-d", "--wide", str(path)], stdout=subprocess.PIPE, text=True, errors="replace"
    )
    assert process.stdout is not None
    findings = scan_disassembly(process.stdout)
    if process.wait() != 0:
        raise RuntimeError(f"objdump failed on {path} (exit {process.returncode})")
    return findings


def is_runtime_dispatched(path: pathlib.Path) -> bool:
    match = re.match(r"libggml-cpu-(.+?)\.so", path.name)
    return bool(match) and match.group(1) not in BASELINE_VARIANTS


def elf_files(directory: pathlib.Path) -> list[pathlib.Path]:
    files = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    files.append(path)
    return files


def scan_directory(directory: pathlib.Path) -> dict[pathlib.Path, list[Finding]]:
    """Per ELF file in `directory` (runtime-dispatched variants skipped): what is beyond the baseline."""
    return {path: scan_file(path) for path in elf_files(directory) if not is_runtime_dispatched(path)}


def summarize(findings: list[Finding], limit: int = 5) -> str:
    by_function: dict[str, list[Finding]] = {}
    for finding in findings:
        by_function.setdefault(finding.function, []).append(finding)
    lines = [f"{len(findings)} instructions in {len(by_function)} functions, e.g."]
    for function, found in list(by_function.items())[:limit]:
        lines.append(f"  {function}: {found[0].instruction} [{found[0].why}]")
    return "\n".join(lines)
