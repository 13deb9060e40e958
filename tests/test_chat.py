"""``chatbot chat`` end to end with piped stdin, as a user scripts it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CHATBOT = Path(sys.executable).parent / "chatbot"
MESSAGES = "hi there\n\nwhat do you do for fun?\ndo you like music\n"  # the blank line is skipped


def chat(model_dir: Path, *flags: str, stdin: str = MESSAGES) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHATBOT), "chat", "--model", str(model_dir), *flags], input=stdin,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def seeded(tiny_model_dir):
    return chat(tiny_model_dir, "--seed", "1", "--min-new-tokens", "6", "--temperature", "1.0")


def test_one_reply_per_line_and_the_seed_reproduces(tiny_model_dir, seeded):
    assert seeded.returncode == 0, seeded.stderr
    lines = seeded.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 4  # three replies, each ended by a newline
    assert all(line.strip() for line in lines[:3])
    again = chat(tiny_model_dir, "--seed", "1", "--min-new-tokens", "6", "--temperature", "1.0")
    assert again.stdout == seeded.stdout
    other = chat(tiny_model_dir, "--seed", "2", "--min-new-tokens", "6", "--temperature", "1.0")
    assert other.stdout != seeded.stdout


def test_show_candidates_goes_to_stderr_and_blocklist_applies(tiny_model_dir, seeded, tmp_path):
    first_words = sorted({m.group(0) for line in seeded.stdout.splitlines() for m in [re.search(r"\w+", line)] if m})
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("# words the seeded run said\n" + "\n".join(first_words) + "\n", encoding="utf-8")
    result = chat(tiny_model_dir, "--seed", "1", "--min-new-tokens", "6", "--temperature", "1.0",
                  "--num-candidates", "5", "--show-candidates", "--blocklist", str(blocklist))
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) == 3
    for reply in replies:
        for word in first_words:
            assert not re.search(rf"(?<!\w){re.escape(word)}(?!\w)", reply, re.IGNORECASE), (word, reply)
    assert result.stderr.count("candidates, best first") == 3
    assert len(re.findall(r"^  [* ] +-?\d+\.\d\d \(", result.stderr, re.MULTILINE)) == 3 * 5


def test_beam_search_from_the_command_line(tiny_model_dir):
    result = chat(tiny_model_dir, "--strategy", "beam", "--beam-size", "3", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3


@pytest.mark.parametrize("flags, message", [
    (("--temperature", "0"), "temperature must be"),
    (("--num-candidates", "0"), "num_candidates must be in 1..256"),
    (("--strategy", "nucleus"), "strategy must be one of"),
    (("--blocklist", "/nonexistent/blocked.txt"), "no such file"),
])
def test_bad_flags_fail_clearly(tiny_model_dir, flags, message, capsys):
    from chatbot.cli import main  # in-process: these fail before any model work

    assert main(["chat", "--model", str(tiny_model_dir), *flags]) == 2
    assert message in capsys.readouterr().err


def test_knowledge_sources_go_to_stderr(tiny_model_dir, tmp_path):
    """A reply engine over a knowledge index: the passages a reply was given print to stderr, stdout stays
    one reply a line.  The tiny model does not read passages, so ``--knowledge DIR`` asks for them."""
    from retrieval.embedder import load_embedder
    from retrieval.knowledge import KnowledgeIndex
    from tests.knowledge_support import small_wiki

    index = tmp_path / "kb"
    KnowledgeIndex.build(index, small_wiki(), load_embedder()).close()
    result = chat(tiny_model_dir, "--seed", "1", "--knowledge", str(index),
                  stdin="hi\nwho painted the Mona Lisa?\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert re.search(r"^ +\[1\] Mona Lisa <https?://", result.stderr, re.MULTILINE), result.stderr


def test_knowledge_follows_the_model_and_a_bad_directory_is_named(tiny_model_dir, tmp_path):
    plain = chat(tiny_model_dir, "--seed", "1", stdin="who painted the Mona Lisa?\n")
    assert plain.returncode == 0 and "[1]" not in plain.stderr  # auto: this model reads no passages
    missing = chat(tiny_model_dir, "--knowledge", str(tmp_path / "nowhere"), stdin="hi\n")
    assert missing.returncode != 0 and "--knowledge" in missing.stderr and "nowhere" in missing.stderr
