"""Library lines are logging records: stdout lines by default, the application's handlers
when it has some."""

import logging

from dist_diffusion.logs import get_logger, route_to_application


def test_records_are_lines_on_stdout_by_default(capsys):
    get_logger("train").info("step 3/10 loss 0.5")
    get_logger("train").debug("not at INFO")
    assert capsys.readouterr().out == "[train] step 3/10 loss 0.5\n"


def test_an_application_handler_takes_the_records_instead(capsys):
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.levelname, record.getMessage()))

    package, root, handler = logging.getLogger("dist_diffusion"), logging.getLogger(), Keep()
    saved = list(package.handlers)
    root.addHandler(handler)
    try:
        route_to_application()
        get_logger("eval").warning("reference statistics computed")
    finally:
        root.removeHandler(handler)
        package.handlers, package.propagate = saved, False
    assert seen == [("dist_diffusion.eval", "WARNING", "reference statistics computed")]
    assert capsys.readouterr().out == ""


def test_the_level_is_the_applications_to_set(capsys):
    package = logging.getLogger("dist_diffusion")
    saved = package.level
    package.setLevel(logging.WARNING)
    try:
        get_logger("train").info("hidden")
        get_logger("train").warning("shown")
    finally:
        package.setLevel(saved)
    assert capsys.readouterr().out == "[train] shown\n"
