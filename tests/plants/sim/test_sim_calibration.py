"""The committed calibration meets its targets; the calibrate command; HF config parsing."""
import json
from importlib import resources

import pytest

from palsctl.cli import main as cli_main
from palsctl.errors import ConfigError
from palsctl.plants.sim import ModelSpec, PlantConstants, default_constants, get_model
from palsctl.plants.sim import calibration as cal


@pytest.fixture(scope="module")
def rows(shared_data):
    return cal.load_rows(shared_data / cal.DATA_RELATIVE)


def test_default_plant_uses_committed_constants():
    text = resources.files("palsctl").joinpath("data/calibration.json").read_text()
    committed = json.loads(text)["constants"]
    assert default_constants() == PlantConstants(**committed)
    assert default_constants() != PlantConstants()


def test_committed_calibration_meets_targets(rows):
    report = cal.evaluate(default_constants(), rows)
    assert report["h100"]["rows"] >= 150
    assert cal.check_report(report) == []
    assert report["h100"]["mape_throughput"] <= 0.10
    assert report["h100"]["mape_power"] <= 0.10
    assert report["h100"]["mape_itl"] <= 0.12


@pytest.mark.slow
def test_leave_one_family_out_within_20_percent(rows):
    out = cal.leave_one_family_out(rows, default_constants(), groups=("h100",))
    assert set(out["lofo"]["h100"]) >= {"llama", "qwen3", "qwen3-moe", "gpt-oss", "gemma3"}
    for fam, v in out["lofo"]["h100"].items():
        for key in ("mape_throughput", "mape_power", "mape_itl"):
            assert v[key] <= 0.20, (fam, key, v[key])


def test_check_report_flags_a_bad_plant(rows):
    bad = PlantConstants(bw_eff=0.4, flops_eff=0.9, dyn_power_frac=2.5, v_floor=0.95)
    fails = cal.check_report(cal.evaluate(bad, rows))
    assert any("H100" in f for f in fails) and any("A100" in f for f in fails)


def test_cli_check_passes_and_writes_json(tmp_path, capsys, shared_data):
    out = tmp_path / "report.json"
    rc = cli_main(["calibrate", "--check", "--no-lofo", "--quiet", "--json", str(out),
                   "--data", str(shared_data)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "regression bounds met" in text and "H100" in text
    assert "fidelity targets met:" in text
    rep = json.loads(out.read_text())
    assert len(rep["rows_h100"]) == rep["h100"]["rows"]


def test_cli_missing_data_file_is_one_line_error(tmp_path, capsys):
    rc = cli_main(["calibrate", "--check", "--csv", str(tmp_path / "nope.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.csv" in err and "--csv" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    # --data names a data folder: one without the file says which file and how to get it
    rc = cli_main(["calibrate", "--check", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "llm_configs.csv" in err and len(err.strip().splitlines()) == 1


def test_cli_wrong_csv_is_one_line_error(tmp_path, capsys):
    f = tmp_path / "x.csv"
    f.write_text("a,b\n1,2\n")
    rc = cli_main(["calibrate", "--check", "--csv", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and "missing columns" in err
    # the old meaning of --data (the CSV itself) still works, with a warning
    rc = cli_main(["calibrate", "--check", "--data", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and "missing columns" in err and "--data with a CSV file is deprecated" in err


# ---- Hugging Face configs ------------------------------------------------------------------
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
           "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
           "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
           "vocab_size": 32000, "tie_word_embeddings": False, "model_type": "mixtral"}
QWEN3_MOE = {"hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
             "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
             "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
             "vocab_size": 151936, "tie_word_embeddings": False}
DEEPSEEK = {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16,
            "num_key_value_heads": 16, "intermediate_size": 10944,
            "moe_intermediate_size": 1408, "n_routed_experts": 64, "num_experts_per_tok": 6,
            "n_shared_experts": 2, "first_k_dense_replace": 1, "vocab_size": 102400}
LLAMA8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256}


@pytest.mark.parametrize("cfg, preset, params_b", [
    (MIXTRAL, "mixtral-8x7b", 46.7), (QWEN3_MOE, "qwen3-30b-a3b", 30.5),
    (DEEPSEEK, "deepseek-moe-16b", 16.4), (LLAMA8B, "llama-3.1-8b", 8.03),
])
def test_from_hf_config_matches_presets_and_published_sizes(cfg, preset, params_b):
    m = ModelSpec.from_hf_config(cfg, name="x")
    p = get_model(preset)
    for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
              "num_experts", "experts_per_token", "moe_intermediate_size",
              "shared_intermediate_size", "num_dense_layers"):
        assert getattr(m, f) == getattr(p, f), f
    assert m.total_params / 1e9 == pytest.approx(params_b, rel=0.03)
    assert m.weight_bytes == pytest.approx(2 * m.total_params)


def test_published_active_params():
    # published "activated" counts include the input embedding (a gather, not FLOPs)
    def act(name):
        m = get_model(name)
        return (m.active_params + m.vocab_size * m.hidden_size) / 1e9
    assert act("mixtral-8x7b") == pytest.approx(12.9, rel=0.03)
    assert act("qwen3-30b-a3b") == pytest.approx(3.3, rel=0.03)
    assert get_model("olmoe-1b-7b").total_params / 1e9 == pytest.approx(6.9, rel=0.03)
    assert get_model("gpt-oss-20b").total_params / 1e9 == pytest.approx(20.9, rel=0.05)


@pytest.mark.parametrize("missing", ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "vocab_size", "num_experts_per_tok"])
def test_from_hf_config_missing_field_names_it(missing):
    cfg = dict(MIXTRAL)
    del cfg[missing]
    with pytest.raises(ConfigError, match=missing):
        ModelSpec.from_hf_config(cfg, name="mixtral")


def test_from_hf_config_bad_values():
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelSpec.from_hf_config({**LLAMA8B, "hidden_size": "big"}, name="x")
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelSpec.from_hf_config({k: v for k, v in LLAMA8B.items() if k != "intermediate_size"},
                                 name="x")
    with pytest.raises(ConfigError):
        ModelSpec.from_hf_config([1, 2], name="x")


# published configs (config.json fields) of the architectures from_hf_config must cover
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
               "moe_intermediate_size": 2048, "num_hidden_layers": 61,
               "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
               "n_routed_experts": 256, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
               "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": 1536,
               "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
               "vocab_size": 129280, "tie_word_embeddings": False,
               "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                       "weight_block_size": [128, 128]}}
MAVERICK = {"model_type": "llama4", "quantization_config": {"quant_method": "fbgemm_fp8"},
            "text_config": {"model_type": "llama4_text", "hidden_size": 5120,
                            "intermediate_size": 8192, "intermediate_size_mlp": 16384,
                            "num_hidden_layers": 48, "num_attention_heads": 40,
                            "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 128,
                            "num_experts_per_tok": 1, "interleave_moe_layer_step": 2,
                            "vocab_size": 202048, "attention_chunk_size": 8192,
                            "tie_word_embeddings": False}}
QWEN15_MOE = {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
              "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
              "num_experts": 60, "num_experts_per_tok": 4, "decoder_sparse_step": 1,
              "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
              "vocab_size": 151936, "tie_word_embeddings": False}


@pytest.mark.parametrize("cfg, preset, total_b, active_b", [
    (DEEPSEEK_V3, "deepseek-v3", 671, 37), (MAVERICK, "llama-4-maverick-fp8", 400, 17),
    (QWEN15_MOE, "qwen1.5-moe-a2.7b", 14.3, None),
])
def test_from_hf_config_mla_shared_experts_layer_mixes_fp8(cfg, preset, total_b, active_b):
    m = ModelSpec.from_hf_config(cfg, name="x", family=get_model(preset).family)
    p = get_model(preset)
    for f in ("num_layers", "hidden_size", "num_heads", "head_dim", "intermediate_size",
              "num_experts", "experts_per_token", "moe_intermediate_size",
              "shared_intermediate_size", "num_dense_layers", "dtype_bytes", "compute_bytes",
              "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
              "sliding_window", "sliding_layer_fraction"):
        if f == "intermediate_size" and not p.num_dense_layers:
            continue     # no dense FFN layer: the width is unused
        assert getattr(m, f) == getattr(p, f), f
    assert m.total_params / 1e9 == pytest.approx(total_b, rel=0.03)
    if active_b is not None:   # published "activated" counts include the input embedding
        act = (m.active_params + m.vocab_size * m.hidden_size) / 1e9
        assert act == pytest.approx(active_b, rel=0.03)


def test_mla_cache_is_one_latent_per_token_and_not_split_by_tensor_parallel():
    from palsctl.plants.sim import get_gpu
    from palsctl.plants.sim.steady import group_model

    m = ModelSpec.from_hf_config(DEEPSEEK_V3, name="dsv3")
    assert m.is_mla and m.kv_shards == 1
    assert m.kv_bytes_per_token == 61 * (512 + 64) * 2.0
    # absorbed decode attention works on the latent: (2 × 512 + 64) × 2 FLOPs per head
    assert m.attn_flops_per_pair == 61 * 128 * 2.0 * (2 * 512 + 64)
    assert m.weight_bytes == pytest.approx(m.total_params * 1.0)    # fp8: one byte per weight
    gm = group_model(get_model("deepseek-v3"), get_gpu("b200"), 8, None, "tp+ep")
    assert gm._kv_tok == m.kv_bytes_per_token          # every GPU holds the whole latent


def test_from_hf_config_layer_mixes():
    # Qwen-MoE style: every second layer sparse, and layer 3 forced dense
    cfg = {**QWEN15_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    m = ModelSpec.from_hf_config(cfg, name="x")
    assert m.num_moe_layers == 11 and m.num_dense_layers == 13
    # DeepSeek style: leading dense layers, then every moe_layer_freq-th layer sparse
    m = ModelSpec.from_hf_config({**DEEPSEEK_V3, "moe_layer_freq": 2}, name="x")
    assert m.num_moe_layers == len([i for i in range(3, 61) if i % 2 == 0])
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        ModelSpec.from_hf_config({**QWEN15_MOE, "mlp_only_layers": 3}, name="x")


def test_from_hf_config_weight_formats():
    m = ModelSpec.from_hf_config({**QWEN3_MOE, "quantization_config": {"quant_method": "fp8"}},
                                 name="x")
    assert m.dtype_bytes == 1.0 and m.compute_bytes == 1
    oss = ModelSpec.from_hf_config({**QWEN3_MOE, "quantization_config": {
        "quant_method": "mxfp4"}}, name="x")
    assert oss.dtype_bytes == 2.0 and oss.expert_dtype_bytes == pytest.approx(0.53)
    assert oss.compute_bytes == 2
    ct = ModelSpec.from_hf_config({**LLAMA8B, "quantization_config": {
        "quant_method": "compressed-tensors",
        "config_groups": {"g0": {"weights": {"num_bits": 8, "type": "float"}}}}}, name="x")
    assert ct.dtype_bytes == 1.0
    # an explicit dtype_bytes overrides the config
    assert ModelSpec.from_hf_config({**LLAMA8B, "quantization_config": {
        "quant_method": "fp8"}}, name="x", dtype_bytes=2.0).dtype_bytes == 2.0
    with pytest.raises(ConfigError, match="quant_method"):
        ModelSpec.from_hf_config({**LLAMA8B, "quantization_config": {"quant_method": "gguf"}},
                                 name="x")
