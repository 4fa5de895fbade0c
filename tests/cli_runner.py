"""The one CliRunner through which tests run capcli's commands in this process: `runner.invoke(app, [...])`.
Click's runner keeps stdout and stderr apart (result.stdout, result.stderr), as a shell does."""

from typer.testing import CliRunner

runner = CliRunner()
