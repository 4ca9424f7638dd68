"""TRL's own trainer tests, ported to run against lenvm-rl's trainers; ./conftest.py builds the models they load."""
