"""`pmlm advise`: guidance for one patient from her on-site personalised prompt."""

from __future__ import annotations

import sys
from pathlib import Path

from pmlm.cli import CliError


def register(sub) -> None:
    p = sub.add_parser("advise", help="assemble the patient's personalised prompt on-site and ask the site's LLM")
    p.add_argument("--site", type=Path, required=True, help="the site directory (with site.json)")
    p.add_argument("--patient", required=True, metavar="ID",
                   help="the patient id (for obgyn, `pmlm data inspect DIR --pregnant` lists some)")
    p.add_argument("--question", default=None,
                   help="the question, answered with the patient's prompt (default: the profile's question, general "
                        "guidance for the next weeks)")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the prompt sent to the LLM and where each of its facts came from")
    p.add_argument("--max-tokens", type=int, default=200, help="longest answer, in tokens")
    p.set_defaults(handler=cmd_advise)


def cmd_advise(args) -> int:
    from pmlm.client.assemble.assembler import describe_sources, find_patient, site_assembler
    from pmlm.client.assemble.check import (advice_notice, care_checklist, check_advice, format_checked_answer,
                                            format_checklist, model_label)
    from pmlm.client.reward import matcher_for
    from pmlm.client.llm import LLMError, open_llm, site_llm_config
    from pmlm.client.site_config import SiteConfigError

    try:
        config, assembler = site_assembler(args.site)
        timeline, example = find_patient(config, args.patient, assembler.a.profile)
    except (SiteConfigError, LookupError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    assembled = assembler.assemble(example, timeline, args.question)
    for note in assembled.missing:
        print(f"note: {note}", file=sys.stderr)
    if assembled.policy:  # which policy chose her prompt's options: the site's own refinement or the consortium's
        print(f"note: prompt options chosen by the {assembled.policy} policy", file=sys.stderr)
    if args.show_prompt:
        for message in assembled.prompt.messages:
            print(f"--- {message['role']} ---\n{message['content']}\n")
        print("Where the facts in her prompt came from:")
        print((describe_sources(assembled.prompt) or "  (no patient facts in this prompt)") + "\n")
    llm_config = site_llm_config(args.site, config.llm)
    try:
        with open_llm(llm_config) as llm:
            answer = llm.chat(assembled.prompt.messages, max_tokens=args.max_tokens)
    except LLMError as exc:
        raise CliError(f"the LLM could not answer: {exc}") from None
    # What PMLM predicts first, then the LLM's prose checked against her prompt, then who wrote it (#21).
    print(format_checklist(care_checklist(assembled)))
    print("\nGuidance:")
    print(format_checked_answer(check_advice(answer.text, assembled, example, matcher_for(config.profile))))
    print("\n" + advice_notice(model_label(llm_config, answer.model)))
    return 0
