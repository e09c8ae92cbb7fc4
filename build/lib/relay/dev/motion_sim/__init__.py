"""Local Spatius Motion Server simulator: console token API and ingress WebSocket."""

from relay.dev.motion_sim.animation import (
    FPS,
    KEYFRAME_SIZE,
    AnimationBatch,
    Keyframe,
    KeyframeGenerator,
    decode_animation,
    encode_animation,
    keyframes_for_audio,
)
from relay.dev.motion_sim.faults import FaultKind, FaultRule
from relay.dev.motion_sim.server import bound_port, create_app, run_forever, serve
from relay.dev.motion_sim.sim import SIM_KEY, MotionSim, SimConfig, SimStats

__all__ = [
    "FPS",
    "KEYFRAME_SIZE",
    "SIM_KEY",
    "AnimationBatch",
    "FaultKind",
    "FaultRule",
    "Keyframe",
    "KeyframeGenerator",
    "MotionSim",
    "SimConfig",
    "SimStats",
    "bound_port",
    "create_app",
    "decode_animation",
    "encode_animation",
    "keyframes_for_audio",
    "run_forever",
    "serve",
]
