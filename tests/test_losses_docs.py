"""docs/losses.md: its worked examples run as written (one namespace, blocks in order)."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def test_losses_doc_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 3, "docs/losses.md should hold the RPO, GRPO and variants examples"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102
    # The examples assert their own learning progress; check what they left behind too.
    assert namespace["loss"] < namespace["first_loss"]
    assert sum(namespace["rewards"][-5:]) > sum(namespace["rewards"][:5])
