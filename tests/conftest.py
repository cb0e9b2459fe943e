import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Paths by the cost model, not by timings on a shared machine: the tests'
# path assertions stay deterministic (tests/test_gram.py times on purpose).
os.environ.setdefault("KERAS_FIM_PATH_CHOICE", "cost")
# No calibrations kept on disk: a test that calibrates times on this run's
# machine, never reads an earlier run's file (tests/test_gram.py tests the store).
os.environ["KERAS_FIM_CALIBRATION_CACHE"] = "off"

# tests/reference.py and tests/helpers.py as the modules `fim_reference` and
# `fim_helpers` (tests import them by those names; pytest's importlib mode puts
# nothing of tests/ on sys.path).
for _name, _file in (("fim_reference", "reference.py"), ("fim_helpers", "helpers.py")):
    _spec = importlib.util.spec_from_file_location(
        _name, os.path.join(os.path.dirname(os.path.abspath(__file__)), _file)
    )
    sys.modules[_name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_name])

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_floatx("float32")


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """A 2-run study (batch 256 and the staged schedule at rate 0.2, 2 epochs)
    shared by the study, CLI, report and TensorBoard tests."""
    from keras_fim import study

    root = tmp_path_factory.mktemp("study")
    configs = study.grid([256], [0.2], ["staged"], epochs=2, every_n_steps=4)
    results = study.run_study(configs, root)
    return root, configs, results
