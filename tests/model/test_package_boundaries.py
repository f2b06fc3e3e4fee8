"""The model package reads batches, never the stored data: importing it loads nothing of `muse_rec.data`
(nor pyarrow), so the feature names it needs live in `muse_rec.schema` and `muse_rec.batch`."""
import subprocess
import sys

PROBE = """
import importlib, pkgutil, sys
import muse_rec.model
for module in pkgutil.iter_modules(muse_rec.model.__path__):
    importlib.import_module(f"muse_rec.model.{module.name}")
print(" ".join(sorted(m for m in sys.modules if m == "pyarrow" or m.startswith("muse_rec.data"))))
"""


def test_importing_the_model_package_loads_nothing_of_the_data_package():
    loaded = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"muse_rec.model imports {loaded}"
