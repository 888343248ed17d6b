"""The site's assembly of one patient's prompt: her self-informed features (`self_informed`), her record's context
(`context`) and the peers' facts, put together from the site's stored artifacts (`assembler`). Rendering and the
policy's choices are shared with the coordinator and live in `pmlm.common.assemble`."""
