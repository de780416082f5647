"""The people the simulations are about: the generated population, imported real data, the
horizontal regions, and where party tables live. Imports nothing else of simulations/."""
