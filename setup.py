"""Maps the top-level folders onto one import namespace (pmlm.common, pmlm.client, pmlm.server).

pyproject.toml holds the metadata; only the folder-to-package mapping needs code, so that a new
sub-package is picked up without editing a list.
"""

from setuptools import find_packages, setup

ROOTS = {"pmlm": "pmlm", "pmlm.common": "common", "pmlm.client": "client", "pmlm.server": "server"}

package_dir = dict(ROOTS)
for name, folder in ROOTS.items():
    if name == "pmlm":
        continue
    for sub in find_packages(folder):
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
for sub in find_packages("pmlm"):
    package_dir[f"pmlm.{sub}"] = f"pmlm/{sub.replace('.', '/')}"

setup(packages=sorted(package_dir), package_dir=package_dir)
