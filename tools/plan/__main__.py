from engine.cli.options import run_cli
from tools.plan.cli import main

run_cli(main)
