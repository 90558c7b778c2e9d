"""Prints every dependency of pyproject.toml (extras included) pinned at its floor, one a line:
what `make test-floors` installs, so the floors live in pyproject.toml alone. A dependency
without a `>=` floor is an error rather than a silent install of its newest release."""
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
    if ">=" not in requirement:
        sys.exit(f"pyproject.toml: {requirement!r} has no >= floor")
    print(requirement.replace(">=", "=="))
