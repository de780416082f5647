"""The `fedscore` command (cli/main.py) and its commands about people (cli/people.py)."""
