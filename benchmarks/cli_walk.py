"""Walk the CLI's training arguments through the code: which kdistill modules a `distill` run passes through
before training starts, how often a call climbs to a higher layer, and how often it re-enters a module it left.
Usage: python walk.py -- kdistill distill args... (stops at the first training epoch)."""
import sys
LAYERS = ["config.types", "io", "_version", "data", "models", "teachers", "losses", "methods", "config", "engine",
          "outputs", "sweeps", "experiments", "distiller", "cli"]
OLD = {"blackbox": "teachers", "ensemble": "teachers", "teachers": "teachers", "specialists": "teachers",
       "engine.teaching": "teachers", "engine.views": "teachers", "schema": "config", "config": "config",
       "deploy": "outputs", "report": "outputs", "html_report": "outputs", "multi": "sweeps", "stacked": "sweeps",
       "sweeps": "sweeps", "evaluate": "engine", "cuda_graph": "engine", "distributed": "engine", "train": "engine",
       "divergences": "losses", "bias": "models", "commands": "cli"}


def layer(mod):
    rest = mod[len("kdistill."):] if mod.startswith("kdistill.") else mod
    if OLD_LAYOUT:
        head = rest if rest in OLD else rest.split(".")[0] if rest.split(".")[0] in OLD else None
        if rest.startswith("engine.teaching") or rest.startswith("engine.views"):
            head = rest
        if head in OLD:
            rest = OLD[head]
    for i, l in enumerate(LAYERS):
        if rest == l or rest.startswith(l + "."):
            return i
    return len(LAYERS)
import os
OLD_LAYOUT = bool(os.environ.get('OLD_LAYOUT'))


class Stop(Exception): pass
seen, order, stack, climbs, reentries = set(), [], [], 0, 0
left = set()
active = [False]
pairs = {}
def prof(frame, event, arg):
    global climbs, reentries
    mod = frame.f_globals.get("__name__", "")
    if not mod.startswith("kdistill") or not frame.f_code.co_filename.endswith(".py") or frame.f_code.co_name.startswith("<"):
        return
    if event == "call" and not active[0]:
        if frame.f_code.co_name != "_train_like":
            return
        active[0] = True
    if not active[0]:
        return
    if event == "call":
        if frame.f_code.co_name == "run_epochs":
            raise Stop
        caller = stack[-1] if stack else None
        if caller and caller != mod:
            if layer(mod) > layer(caller):
                climbs += 1; pairs[(caller, mod)] = pairs.get((caller, mod), 0) + 1
            if mod in left: reentries += 1
            left.add(caller)
        if mod not in seen:
            seen.add(mod); order.append(mod)
        stack.append(mod)
    elif event == "return" and stack:
        stack.pop()
argv = sys.argv[sys.argv.index("--") + 2:]
from kdistill.cli import main
sys.setprofile(prof)
try:
    main(argv)
except Stop:
    pass
finally:
    sys.setprofile(None)
print(f"modules visited: {len(seen)}; climbs to a higher layer: {climbs}; re-entries into a module already left: {reentries}")
print(" -> ".join(m.replace("kdistill.", "") for m in order))
print("climbs:", sorted(pairs.items(), key=lambda x: -x[1])[:15])
