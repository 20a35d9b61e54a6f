"""The SIP user agent: answers calls (or SIPREC copies of calls) and transcribes their RTP.

`core` is backend-neutral (admission, labels, per-call wiring, watchdogs); `sdp` and `rtp`
are sans-I/O codecs; `asyncio_backend` (default, aiosipua) and `pjsua2_backend` (PJSIP,
capped per process) do signalling behind `backend.SipBackend`. See ../shared/protocols/sip.md.
"""
