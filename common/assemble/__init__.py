"""What both sides know of a prompt: how it is rendered from a patient's context (`render`) and the policy that
chooses its parameters (`policy`). The site's own assembly of her features lives in `pmlm.client.assemble`."""
