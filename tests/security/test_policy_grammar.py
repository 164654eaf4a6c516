"""Policy files read alike by the gateway, by Casbin and by a person (issue 15, item 3).

Each hostile file found by the differential attack is refused naming `file:line` (a physical line)
and why, or, where every reader agrees on it, enforced as they all read it. Over random files built
from the same hostile characters, whatever the loader accepts Casbin's own file reader and a
per-line CSV reader (Go Casbin's) read line for line alike, with no line break a person's editor
would show that the loader did not see; `lint` and `explain` say so.
"""

from __future__ import annotations

import csv
import random
import re
import shutil
from pathlib import Path

import casbin
import pytest
from casbin.persist.adapters import FileAdapter

from control.cli import main
from gateway.policy import rules as policy_mod
from gateway.policy import text as policy_text
from gateway.policy.lint import lint, lint_directory
from gateway.policy.rules import PolicyError, load_policy

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"
HIDDEN_GRANT = "g, acme/eve, tenant-admin, acme"
ADMIN = ("admin:policy", "admin")


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy"
    shutil.copytree(REPO_POLICY, directory, ignore=shutil.ignore_patterns("*.md"))
    return directory


def append(directory: Path, text: str, name: str = "policy.csv") -> int:
    """Append raw text (no newline handling) to a policy file; the physical line it starts on."""
    path = directory / name
    data = path.read_bytes()
    assert data.endswith(b"\n")
    path.write_bytes(data + text.encode())
    return data.count(b"\n") + 1


def comments(chars: int) -> str:
    """Comment lines (each within the line limit) of exactly `chars` characters, newlines included."""
    lines = []
    while chars > 4001:
        lines.append("#" * 3999 + "\n")
        chars -= 4000
    return "".join(lines) + ("#" * (chars - 1) + "\n" if chars else "")


def refusal(directory: Path) -> tuple[str, int, str]:
    """(file, physical line, reason) of a refused directory."""
    with pytest.raises(PolicyError) as info:
        load_policy(directory)
    match = re.fullmatch(r"(.*?):(\d+): (.*)", str(info.value), re.DOTALL)
    assert match, f"the refusal names no line: {info.value}"
    return match[1], int(match[2]), match[3]


def casbin_from_files(directory: Path) -> casbin.Enforcer:
    return casbin.Enforcer(str(directory / "model.conf"), str(directory / "policy.csv"))


# --- the hostile files ------------------------------------------------------------------------------

# Every character Python's str.splitlines() breaks a line at, besides \n and \r\n, and a few that
# hide text from a reviewer: each lets a line carry more than a person sees.
HIDING = [
    ("\f", "FORM FEED"),
    ("\v", "LINE TABULATION"),
    ("\x1c", "FILE SEPARATOR"),
    ("\x1d", "GROUP SEPARATOR"),
    ("\x1e", "RECORD SEPARATOR"),
    ("\x85", "NEXT LINE"),
    ("\u2028", "LINE SEPARATOR"),
    ("\u2029", "PARAGRAPH SEPARATOR"),
    ("\r", "carriage return not followed by a newline"),
    ("\x00", "NULL"),
    ("\x1b", "ESCAPE"),
    ("\u202e", "RIGHT-TO-LEFT OVERRIDE"),
    ("\u200b", "ZERO WIDTH SPACE"),
    ("\ufeff", "ZERO WIDTH NO-BREAK SPACE"),
    ("\xa0", "NO-BREAK SPACE"),
]


@pytest.mark.parametrize(("char", "name"), HIDING, ids=[f"U+{ord(c):04X}" for c, _ in HIDING])
@pytest.mark.parametrize("carrier", ["g, acme/bob, user, acme", "# reviewed by the security team"])
def test_a_hidden_line_is_refused_naming_its_physical_line(
    policy_dir: Path, char: str, name: str, carrier: str
) -> None:
    """`g, acme/eve, tenant-admin, acme` after a form feed (or U+2028, U+0085...) on a harmless line
    was granted, lint was silent and `explain` said Casbin agreed."""
    number = append(
        policy_dir, f"g, acme/bob, user, acme\n{carrier}{char}{HIDDEN_GRANT}\ng, acme/demo, user, acme\n"
    )
    path, line, reason = refusal(policy_dir)
    assert (path, line) == (str(policy_dir / "policy.csv"), number + 1)
    assert name in reason and f"column {len(carrier) + 1}" in reason
    assert next(f for f in lint_directory(policy_dir) if f.code == "SYNTAX").line == number + 1


def test_a_cr_only_file_is_refused_at_line_1(policy_dir: Path) -> None:
    path = policy_dir / "policy.csv"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r"))
    _, line, reason = refusal(policy_dir)
    assert line == 1 and "carriage return" in reason


def test_crlf_line_ends_are_accepted_and_read_as_casbin_does(policy_dir: Path) -> None:
    path = policy_dir / "policy.csv"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    policy = load_policy(policy_dir)
    assert policy.casbin_reads_differently() is None
    assert [str(r) for r in policy.rules] == [str(r) for r in load_policy(REPO_POLICY).rules]


@pytest.mark.parametrize("shift", [-1, 0, 1])
def test_characters_at_the_edge_of_a_scanned_slice_are_seen(policy_dir: Path, shift: int) -> None:
    """The text is scanned a slice at a time (so a 100k-line reload never holds the GIL long): a
    hidden character just before, at or after a slice's edge is refused as anywhere else, and a
    CRLF split across the edge is still a line end."""
    path = policy_dir / "policy.csv"
    edge = policy_text._SLICE - len(path.read_text())  # characters to the first slice's edge
    # Comment lines up to the edge: the next line's third character is `shift` after it.
    padding = comments(edge - 2 + shift)
    number = append(policy_dir, padding + HIDDEN_GRANT[:2] + "\x0c" + HIDDEN_GRANT[2:] + "\n")
    _, line, reason = refusal(policy_dir)
    assert line == number + padding.count("\n") and "FORM FEED" in reason and "column 3" in reason

    shutil.copy(REPO_POLICY / "policy.csv", path)
    crlf = comments(edge - 2 + shift)[:-1] + "\r\n"  # the \r and \n on either side of the edge at shift 1
    append(policy_dir, crlf + "g, acme/zed, user, acme\n")
    links = load_policy(policy_dir).links
    assert ("acme", "acme/zed", "user") in {(g.tenant, g.member, g.role) for g in links}


def test_a_byte_order_mark_is_refused_at_line_1(policy_dir: Path) -> None:
    path = policy_dir / "policy.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    _, line, reason = refusal(policy_dir)
    assert line == 1 and "byte order mark" in reason


def test_a_quote_in_a_comment_no_longer_swallows_the_deny_below_it(policy_dir: Path) -> None:
    """An unclosed `"` made the CSV reader swallow the following lines: the deny disappeared. A
    comment is a comment whatever it holds, for Casbin, for a person and now for the gateway."""
    number = append(
        policy_dir,
        'g, acme/mallory, user, acme\n# mallory, "on leave until the review\n'
        "p, acme/mallory, acme, *, *, deny\n",
    )
    policy = load_policy(policy_dir)
    assert [r.line for r in policy.rules if r.subject == "acme/mallory"][-1] == number + 2
    assert not policy.decide("acme/mallory", "acme", "model:smollm2", "generate").allowed
    assert not casbin_from_files(policy_dir).enforce("acme/mallory", "acme", "model:smollm2", "generate")
    assert policy.casbin_reads_differently() is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        # Quotes: CSV unquoted then stripped them (" acme/eve " became acme/eve); Casbin's file reader
        # keeps them; Go's unquotes. Refused rather than read one of three ways.
        ('g, " acme/eve ", tenant-admin, acme', "quotes are not part of the grammar"),
        ('p, "acme/mallory, acme, *, *, deny', "quotes are not part of the grammar"),
        ('g, acme/eve, "tenant-admin", acme', "quotes are not part of the grammar"),
        # Casbin's file reader groups fields inside () and [], and fails on an unmatched closer.
        ("g, acme/eve, user(, acme", "parentheses are not allowed"),
        ("p, acme/eve, acme, model:a), generate, allow", "parentheses are not allowed"),
        ("p, acme/eve, acme, model:[x, y], generate, allow", "brackets are not allowed"),
        (",,,", "empty field"),  # Casbin's file reader fails on it (IndexError)
        ("g, acme/eve, user, acme, ", "empty field"),
    ],
)
def test_a_field_outside_the_grammar_is_refused(policy_dir: Path, line: str, reason: str) -> None:
    number = append(policy_dir, f"# before\n{line}\ng, acme/demo, user, acme\n")
    path, at, why = refusal(policy_dir)
    assert (path, at) == (str(policy_dir / "policy.csv"), number + 1)
    assert reason in why


def test_a_131072_character_field_is_refused_not_raised(policy_dir: Path) -> None:
    """Python's csv module raised `_csv.Error` (not a PolicyError) past 131,072 characters."""
    number = append(policy_dir, f"p, acme/{'x' * 131_072}, acme, models, list, allow\n")
    _, line, reason = refusal(policy_dir)
    assert line == number and "longer than the 4096" in reason
    assert len(reason) < 200  # the value is never echoed whole into a log or the audit trail


def test_line_numbers_are_physical_lines(policy_dir: Path) -> None:
    """A quoted field spanning two lines made every later line number one short."""
    number = append(
        policy_dir, '# a "note\r\n# over two lines"\r\n\r\np, acme/bob, acme, model:*, fly, allow\n'
    )
    _, line, reason = refusal(policy_dir)
    assert line == number + 3 and "unknown action 'fly'" in reason


def test_a_mid_line_hash_is_part_of_the_value_and_lint_says_so(policy_dir: Path) -> None:
    """Casbin reads `acme/eve #temporary` as the subject; a person reads a comment. The gateway
    enforces Casbin's reading (eve gets nothing) and lint warns on the line."""
    number = append(policy_dir, "g, acme/eve #until friday, tenant-admin, acme\n")
    policy = load_policy(policy_dir)
    assert policy.links[-1].member == "acme/eve #until friday"
    assert not policy.decide("acme/eve", "acme", *ADMIN).allowed
    assert casbin_from_files(policy_dir).enforce("acme/eve #until friday", "acme", *ADMIN)
    assert policy.decide("acme/eve #until friday", "acme", *ADMIN).allowed
    findings = [f for f in lint(policy) if f.code == "HASH_IN_FIELD"]
    assert [(f.line, f.severity) for f in findings] == [(number, "warning")]
    assert "not a comment" in findings[0].message


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("tenants.toml", "# the new tenant\u2028[tenants.evil]\n", "LINE SEPARATOR"),
        ("tenants.toml", "\n[tenants.x]\nissuers = ['a\fb']\n", "FORM FEED"),
        ("tests.yaml", "- {subject: acme/eve,\x85 tenant: acme}\n", "NEXT LINE"),
        ("tests.yaml", "# ok\u202e\n", "RIGHT-TO-LEFT OVERRIDE"),
        ("model.conf", "# \x1b[2K\n", "ESCAPE"),
    ],
)
def test_other_policy_files_refuse_hiding_characters(
    policy_dir: Path, name: str, text: str, reason: str
) -> None:
    number = append(policy_dir, text, name)
    path, line, why = refusal(policy_dir)
    assert path == str(policy_dir / name)
    assert number <= line <= number + 2 and reason in why


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "tests.yaml",
            "- {subject: acme/bob, tenant: acme, resource: x, action: list, expect: deny, at: 2001-13-01}\n",
        ),
        ("tests.yaml", "- " + "[" * 50_000 + "\n"),
        ("tenants.toml", "deep = " + "[" * 50_000 + "]" * 50_000 + "\n"),
    ],
    ids=["yaml-bad-date-ValueError", "yaml-deep-RecursionError", "toml-deep-RecursionError"],
)
def test_a_parser_crash_is_a_refusal(policy_dir: Path, name: str, text: str) -> None:
    """PyYAML raises ValueError for a bad date and both parsers RecursionError for deep nesting:
    they escaped the loader (and killed the reload) instead of refusing the file."""
    append(policy_dir, text, name)
    with pytest.raises(PolicyError) as info:
        load_policy(policy_dir)
    assert str(policy_dir / name) in str(info.value) and len(str(info.value)) < 3000


# --- lint and explain agree with what is enforced ------------------------------------------------


def _splitlines_loader(path: Path, text: str) -> list[tuple[int, list[str]]]:
    """The loader as it was: Python's splitlines() and a CSV reader."""
    rows = csv.reader(text.splitlines(), skipinitialspace=True)
    return [
        (n, [f.strip() for f in row]) for n, row in enumerate(rows, 1) if row and not row[0].startswith("#")
    ]


def test_explain_and_lint_check_casbins_own_reading_of_the_file(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Had the loader read a hidden line again, `explain` would no longer say Casbin agrees: it
    compares Casbin's own file reader with the lines the gateway enforces, and lint refuses."""
    append(policy_dir, f"g, acme/bob, user, acme\f{HIDDEN_GRANT}\n")
    monkeypatch.setattr(policy_mod, "csv_lines", _splitlines_loader)
    monkeypatch.setattr(policy_mod, "read_policy_file", lambda p: p.read_text())
    policy = load_policy(policy_dir)
    assert policy.decide("acme/eve", "acme", *ADMIN).allowed  # the old reading
    assert "Casbin reads" in (policy.casbin_reads_differently() or "")
    assert "CASBIN_READS_DIFFERENTLY" in {f.code for f in lint(policy) if f.severity == "error"}
    request = ["--subject", "acme/eve", "--tenant", "acme", "--resource", ADMIN[0], "--action", ADMIN[1]]
    code = main(["policy", "explain", "--dir", str(policy_dir), *request])
    out, _ = capsys.readouterr()
    assert code == 1
    assert "CASBIN READS policy.csv DIFFERENTLY" in out and "(agrees)" not in out


def test_explain_agrees_on_an_accepted_file(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    append(policy_dir, "g, acme/eve #until friday, tenant-admin, acme\n")
    request = ["--subject", "acme/eve", "--tenant", "acme", "--resource", ADMIN[0], "--action", ADMIN[1]]
    assert main(["policy", "explain", "--dir", str(policy_dir), *request]) == 0
    out, _ = capsys.readouterr()
    assert "decision: deny" in out and "casbin: deny (agrees)" in out


# --- random files: what is accepted, every reader reads alike -------------------------------------

PIECES = [" ", " ", "\t", "#", '"', "(", ")", "[", "]", "\r", "\f", "\v", "\x85", "\u2028", "\u2029",
          "\ufeff", "\xa0", "\u200b", "\u202e", "\x00", ",", "*", "é"]  # fmt: skip
SUBJECTS = ["acme/eve", "acme/bob", "acme/eve #x", "user", "tenant-admin", "acme/a b", "role#1"]


def random_line(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.15:
        text = rng.choice(["", "   ", "# comment", '  # a "quoted, comment', "\t#x"])
    else:
        if roll < 0.55:
            fields = ["g", rng.choice(SUBJECTS), rng.choice(["user", "tenant-admin", "auditor"]), "acme"]
        else:
            fields = ["p", rng.choice(SUBJECTS), rng.choice(["acme", "*"]), rng.choice(["model:*", "models"]),
                      rng.choice(["generate", "list", "*"]), rng.choice(["allow", "deny"])]  # fmt: skip
        text = ",".join(rng.choice(["", " ", "  ", "\t"]) + f + rng.choice(["", " ", "\t"]) for f in fields)
    if rng.random() < 0.3:  # one hostile piece somewhere in the line
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(PIECES) + text[at:]
    return text + rng.choice(["\n", "\n", "\n", "\r\n"])


def casbin_lines(directory: Path) -> tuple[list[list[str]], list[list[str]]]:
    model = casbin.Enforcer.new_model(path=str(directory / "model.conf"))
    FileAdapter(str(directory / "policy.csv")).load_policy(model)
    return model.model["p"]["p"].policy, model.model["g"]["g"].policy


@pytest.mark.parametrize("seed", range(4))
def test_accepted_files_read_alike_for_every_reader(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    directory = tmp_path / "policy"
    shutil.copytree(REPO_POLICY, directory, ignore=shutil.ignore_patterns("*.md", "policy.csv"))
    (directory / "tests.yaml").write_text("")
    outcomes = {"accepted": 0, "refused": 0}
    for _ in range(150):
        data = "".join(random_line(rng) for _ in range(rng.randint(1, 6)))
        (directory / "policy.csv").write_bytes(data.encode())
        try:
            policy = load_policy(directory)
        except PolicyError as exc:
            outcomes["refused"] += 1
            match = re.match(rf"{re.escape(str(directory / 'policy.csv'))}:(\d+): ", str(exc))
            assert match and 1 <= int(match[1]) <= data.count("\n"), (data, str(exc))
            continue
        outcomes["accepted"] += 1
        ours_p = [[r.subject, r.tenant, r.resource, r.action, r.effect] for r in policy.rules]
        ours_g = [[k.member, k.role, k.tenant] for k in policy.links]
        # Casbin's file reader (pycasbin, the reference):
        assert casbin_lines(directory) == (ours_p, ours_g), data
        # A CSV reader per line, as Go Casbin reads each line:
        rows = [[f.strip() for f in row] for line in data.split("\n")
                for row in csv.reader([line.rstrip("\r")], skipinitialspace=True)
                if row and not row[0].strip().startswith("#") and any(f.strip() for f in row)]  # fmt: skip
        assert [r[1:] for r in rows if r[0] == "p"] == ours_p, data
        assert [r[1:] for r in rows if r[0] == "g"] == ours_g, data
        # A person: no line break anywhere but at \n.
        assert data.replace("\r\n", "\n").splitlines() == data.replace("\r\n", "\n").split("\n")[:-1], data
    assert outcomes["accepted"] > 30 and outcomes["refused"] > 30, outcomes
