"""PMLM: federated, privacy-preserving personalization of medical LLMs.

The code lives in three sub-packages that mirror the data flow:
``pmlm.common`` (shared by sites and coordinator), ``pmlm.client`` (the hospital
side) and ``pmlm.server`` (the coordinator). ``pmlm.cli`` is the one front door.
"""

__version__ = "0.1.0"
