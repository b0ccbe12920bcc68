//! `flamingo devices`: every adapter wgpu finds, and which device `--device` would pick.

use flamingo_kernels::gpu::list_adapters;
use flamingo_kernels::{choose, Choice, DeviceRequest};

pub fn run(request: &str) -> anyhow::Result<()> {
    let adapters = list_adapters();
    if adapters.is_empty() {
        println!("No GPU adapter found. Install a Vulkan, Metal, DX12 or GL driver to use a GPU.");
    }
    for adapter in &adapters {
        let api = adapter.api.map(|api| api.name()).unwrap_or("other");
        println!("[{}] {} ({api}, {:?})", adapter.index, adapter.name, adapter.kind);
        println!("    driver: {}", adapter.driver);
        println!(
            "    max storage binding: {} MiB, max buffer: {} MiB",
            adapter.max_storage_binding >> 20,
            adapter.max_buffer >> 20
        );
        let subgroups = if adapter.subgroups {
            format!("yes ({}-{} lanes)", adapter.subgroup_sizes.0, adapter.subgroup_sizes.1)
        } else {
            "no".to_string()
        };
        println!("    shader f16: {}, subgroups: {subgroups}", if adapter.shader_f16 { "yes" } else { "no" });
        println!("    max workgroup size: {}, max invocations per workgroup: {}", adapter.limits.max_compute_workgroup_size_x, adapter.limits.max_compute_invocations_per_workgroup);
        let features: Vec<&str> = adapter.features.iter_names().map(|(name, _)| name).collect();
        let features = if features.is_empty() { "none".to_string() } else { features.join(", ") };
        println!("    features: {features}");
    }

    let request: DeviceRequest = request.parse()?;
    match choose(request, &adapters)? {
        Choice::Cpu { reason } => println!("--device {request} chooses the CPU backend ({reason})."),
        Choice::Adapter { index, reason } => println!("--device {request} chooses adapter [{index}] ({reason})."),
    }
    Ok(())
}
