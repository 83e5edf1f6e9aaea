from .run import main, run_as_script

run_as_script(main)
