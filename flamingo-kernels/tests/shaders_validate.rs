//! Parses and validates every variant of every WGSL file with naga, so a
//! broken shader fails here on any machine, GPU or not.
//!
//! The templating module is compiled into this test directly; it lists the
//! files and expands each for every subset of the `#if` flags it tests. A
//! variant without the `NATIVE_F16` or `SUBGROUPS` flag is validated without
//! the matching capability, so the fallback paths cannot use them by mistake.

#[path = "../src/gpu/shaders.rs"]
#[allow(dead_code)]
mod shaders;

use naga::valid::{Capabilities, ValidationFlags, Validator};

fn validate(label: &str, flags: &[String], source: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|error| error.emit_to_string(source))?;
    let mut capabilities = Capabilities::all();
    if !flags.iter().any(|flag| flag == "NATIVE_F16") {
        // unpack2x16float stays allowed: wgpu grants it wherever the
        // downlevel flag SHADER_F16_IN_F32 is set, which is every desktop API.
        capabilities.remove(Capabilities::SHADER_FLOAT16);
    }
    if !flags.iter().any(|flag| flag == "SUBGROUPS") {
        capabilities.remove(Capabilities::SUBGROUP | Capabilities::SUBGROUP_BARRIER);
    }
    Validator::new(ValidationFlags::all(), capabilities)
        .validate(&module)
        .map(|_| ())
        .map_err(|error| format!("{label}: {}", error.emit_to_string(source)))
}

#[test]
fn every_shader_variant_validates() {
    let mut failures = Vec::new();
    let mut count = 0;
    for (file, flags, expanded) in shaders::all_variants() {
        if shaders::shader_file(file).is_some_and(|shader| shader.library) {
            // Pasted into other files, which declare what it needs; validated there.
            continue;
        }
        let label = format!("{file} with flags {flags:?}");
        count += 1;
        match expanded {
            Err(message) => failures.push(format!("{label}: template error: {message}")),
            Ok(source) => {
                if let Err(message) = validate(&label, &flags, &source) {
                    failures.push(message);
                }
            }
        }
    }
    assert!(count > 0, "no shader variant was validated");
    assert!(failures.is_empty(), "{} of {count} shader variants failed:\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn every_wgsl_file_is_registered() {
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders");
    for entry in std::fs::read_dir(&folder).expect("the shaders folder exists") {
        let path = entry.expect("readable directory entry").path();
        if path.extension().is_some_and(|extension| extension == "wgsl") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(shaders::shader_file(&name).is_some(), "{name} is in shaders/ but not in SHADER_FILES");
        }
    }
}

#[test]
fn template_directives() {
    // The templating step itself, on a registered file: unknown names fail.
    assert!(shaders::expand("no_such_file.wgsl", &[], &[]).is_err());
    let expanded = shaders::expand("attention.wgsl", &[], &[("HEAD_DIM", 32), ("VALUE_DIM", 16)]).unwrap();
    assert!(expanded.contains("const HEAD_DIM: u32 = 32u;"), "value constants are declared");
    assert!(!expanded.lines().any(|line| line.trim_start().starts_with('#')), "no directive survives expansion");

    // Braces inside #for blocks: loop variables, constants and arithmetic
    // are replaced; anything else, such as a WGSL block, stays as written.
    let bound = [("Q".to_string(), 3), ("E".to_string(), 2)];
    let line = "let a{Q}_{E} = share(own{(4*Q+E)/L}, {(4*Q+E)%L}u); if x { y(); } {Z}";
    let want = "let a3_2 = share(own1, 6u); if x { y(); } {Z}";
    assert_eq!(shaders::substitute(line, &[("L", 8)], &bound), want);
    assert_eq!(shaders::substitute("{Q/0}", &[], &bound), "{Q/0}", "division by zero is not an expression");
}
