"""The deploy kit's Python side (deploy/ holds its scripts, configs and container files): certificates and keys,
the Flower app bundle, the process set, and the local deployment harness that runs a real SuperLink with a
SuperNode per hospital on this machine (`pmlm deploy local`, the deployment tests, `pmlm evaluate --deployment`)."""
