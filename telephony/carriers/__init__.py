"""Carriers' media streams: Telnyx, Plivo, Vonage, Exotel, SignalWire and jambonz.

Each carrier is the WebSocket client and forks a call's audio to a URL its application names.
`events` holds what every codec yields, `json_streams` the Twilio-shaped carriers (one codec,
one dialect each), `vonage` and `jambonz` the two that send binary audio, `handler` the one
aiohttp handler all six run on. See ../shared/protocols/carriers.md.
"""
