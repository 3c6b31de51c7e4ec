use std::path::PathBuf;

use scalpel::models::bert::Bert;
use serde_json::json;

use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    /// Sequence length at which attention FLOPs are counted.
    #[arg(long, default_value_t = 128, value_parser = flags::positive)]
    seq: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> CliResult {
    let bert = Bert::load(&a.model)?;
    let c = &bert.config;
    let total_params: usize = bert
        .params
        .iter()
        .filter(|(_, v)| v.value().dtype().is_float())
        .map(|(_, v)| v.value().numel())
        .sum();
    let (layer_params, layer_flops) = bert.layer_cost(a.seq);
    let embedding_params =
        (c.vocab_size + c.max_position_embeddings + c.type_vocab_size + 2) * c.hidden_size;
    // Per token: three lookups, the adds and the LayerNorm are negligible next to a layer.
    let layers: Vec<_> = (0..bert.num_layers()).map(|l| json!({"index": l, "name": format!("encoder.layer.{l}"), "params": layer_params, "flops_per_token": layer_flops})).collect();
    let encoder_flops = layer_flops * bert.num_layers();
    if a.json {
        let report = json!({
            "architecture": "bert",
            "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers, "heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size, "seq_for_flops": a.seq,
            "embedding_params": embedding_params, "layers": layers,
            "total_params": total_params, "flops_per_token": encoder_flops,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "BERT encoder: {} layers, hidden {}, {} heads, intermediate {}, vocab {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.intermediate_size,
        c.vocab_size
    );
    println!(
        "{:<20} {:>12} {:>18}",
        "layer",
        "params",
        format!("FLOPs/token@{}", a.seq)
    );
    println!("{:<20} {:>12} {:>18}", "embeddings", embedding_params, "-");
    for l in 0..bert.num_layers() {
        println!(
            "{:<20} {:>12} {:>18}",
            format!("encoder.layer.{l}"),
            layer_params,
            layer_flops
        );
    }
    println!("{:<20} {:>12} {:>18}", "total", total_params, encoder_flops);
    Ok(())
}
