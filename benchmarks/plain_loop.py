"""The same per-record work as a run, as a plain loop: the engine's baseline.

Builds the components the config names, then for each item: plan, prompt, generate,
filter, caption, save the image. No journal, no queues, no threads.
"""

import json
import sys
import time
from pathlib import Path


def main() -> None:
    start = time.perf_counter()
    config, refs, bank_file, count, out = sys.argv[1:6]
    count = int(count)

    from chatroom.components import Context
    from chatroom.manager import Plugins
    from chatroom.models import AttributeBank, BankEntry
    from chatroom.plan import plan_item
    from chatroom.resolve import Request, resolve

    resolved = resolve(
        Request(config, {"domain": "fashion", "references": refs, "count": count}),
        Plugins(),
    )
    context = Context(resolved.domain)
    build = lambda spec: spec.cls(spec.options, context)  # noqa: E731
    prompter = build(resolved.one("prompter"))
    generator = build(resolved.one("generator"))
    filters = [build(s) for s in resolved.components["filter"]]
    annotators = [build(s) for s in resolved.components["annotator"]]
    rows = [json.loads(x) for x in Path(bank_file).read_text().splitlines() if x]
    entries = [BankEntry.model_validate(r) for r in rows]
    bank = AttributeBank(
        domain="fashion",
        entries=entries,
        attributes=list(dict.fromkeys(e.attribute for e in entries)),
    )

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        item = plan_item(bank, index, "loop", 0)
        spec = prompter.write([item], resolved.domain)[0]
        candidate = generator.generate([spec], [item.seed])[0]
        for component in filters:
            component.check([candidate])
        for component in annotators:
            component.annotate([candidate], [[]])
        candidate.image.save(folder / f"{index}.png")
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
